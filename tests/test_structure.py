"""The layout's promises: GViT owns encoder, classifier and g0; models declare their parameter
groups; set operations; no private imports across modules; module sizes."""

import ast
import pathlib

import pytest
import torch

from gvit.gaussians import Gaussians, concat, pad
from gvit.models import GaussianClassifier, GaussianEncoder, GViT, PatchViT
from gvit.train import MODELS, param_groups

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "gvit"


def _gvit(**kw):
    torch.manual_seed(0)
    return GViT(GaussianEncoder(16, 4, 12, "micro", **kw), GaussianClassifier(12, 5, "micro"), g0_layout="grid")


def test_gvit_owns_g0_and_gives_gaussians_renders_and_logits():
    model = _gvit().eval()
    images = torch.rand(3, 3, 16, 16)
    a = model.predict(images, generator=torch.Generator().manual_seed(1))
    b = model.predict(images, generator=torch.Generator().manual_seed(1))
    assert a["g"].shape == (3, 12, 9) and a["logits"].shape == (3, 5) and a["rendered"].shape == (3, 3, 16, 16)
    assert torch.equal(a["g"], b["g"]) and torch.equal(a["logits"], b["logits"])  # the seed fixes g0
    g0 = model.sample_g0(3, torch.Generator().manual_seed(1))
    assert torch.equal(model.gaussians(images, g0), a["g"])  # an untrained encoder returns g0 (zero-init head)
    assert torch.allclose(a["logits"], model(images, g0))
    assert 0 <= float(a["rendered"].min()) and float(a["rendered"].max()) <= 1 and a["psnr"].shape == (3,)
    assert _gvit(learned_queries=True).sample_g0(3) is None
    with pytest.raises(ValueError, match="k = 12.*k = 8"):
        GViT(GaussianEncoder(16, 4, 12, "micro"), GaussianClassifier(8, 5, "micro"))


def test_models_declare_no_decay_and_layer_ids():
    model = PatchViT(16, 4, 3, "micro")  # depth 2
    assert model.no_weight_decay() == {"pos_embed", "cls_token"} and model.num_layers == 4
    assert (
        model.layer_id("patch_embed.proj.weight") == 0 and model.layer_id("transformer.blocks.1.attn.qkv.weight") == 2
    )
    assert model.layer_id("head.weight") == 3 and model.last_attention is model.transformer.blocks[-1].attn
    encoder = GaussianEncoder(16, 4, 12, "micro", learned_queries=True)
    assert "queries" in encoder.no_weight_decay()
    groups = param_groups(encoder, 0.05)
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    assert id(encoder.queries) not in decayed and id(encoder.patch_embed.proj.weight) in decayed


def test_load_backbone_keeps_a_new_head_when_the_classes_differ():
    a, b, c = GaussianClassifier(8, 3, "micro"), GaussianClassifier(8, 5, "micro"), GaussianClassifier(8, 3, "micro")
    head = b.head.weight.clone()
    assert b.load_backbone(a.state_dict()) is False and torch.equal(b.head.weight, head)
    assert torch.equal(b.embed.weight, a.embed.weight)
    assert c.load_backbone(a.state_dict()) is True and torch.equal(c.head.weight, a.head.weight)
    with pytest.raises(ValueError, match="do not fit"):
        GaussianClassifier(8, 3, "tiny").load_backbone(a.state_dict())


def test_concat_and_pad_keep_sets_and_masks():
    def sets(b, k, valid=None):
        return Gaussians(torch.rand(b, k, 2), torch.rand(b, k, 2) + 0.1, torch.rand(b, k), torch.rand(b, k, 3),
                         torch.rand(b, k), valid)

    x, y = sets(2, 4), sets(3, 4, torch.rand(3, 4) > 0.5)
    both = concat([x, y])
    assert both.batch_size == 5 and both.valid[:2].all() and torch.equal(both.valid[2:], y.valid)
    assert concat([x, x]).valid is None
    wide = pad(y, 6)
    assert wide.num_gaussians == 6 and not wide.valid[:, 4:].any() and torch.equal(wide.means[:, :4], y.means)
    with pytest.raises(ValueError, match="pad"):
        pad(y, 3)


def _modules():
    return sorted(PACKAGE.rglob("*.py"))


def test_no_module_imports_another_modules_private_names():
    offenders = []
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            # ``from . import _part`` (a package's own private submodule) is fine; ``from .x import _y`` is not
            if isinstance(node, ast.ImportFrom) and node.level > 0 and node.module is not None:
                offenders += [f"{path.relative_to(PACKAGE)}: {a.name}" for a in node.names
                              if a.name.startswith("_") and not a.name.startswith("__")]
    assert offenders == []


def test_modules_stay_small_except_the_numba_kernels():
    sizes = {str(p.relative_to(PACKAGE)): len(p.read_text().splitlines()) for p in _modules()}
    assert {name: n for name, n in sizes.items() if n > 400 and not name.endswith("_kernels.py")} == {}


def _documented_modules() -> list[str]:
    """The module paths listed, in order, in docs/architecture.md's layout block."""
    text = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    block = text.split("## The modules, top to bottom", 1)[1].split("```")[1]
    paths, package = [], None
    for line in block.splitlines():
        name = line.strip().split(" ")[0] if line.strip() else ""
        indent = len(line) - len(line.lstrip())
        if indent == 2 and name.endswith("/"):
            package = name.rstrip("/")
        elif indent == 2 and name.endswith(".py"):
            package = None
            paths.append(name)
        elif indent == 4 and name.endswith(".py") and package:
            paths.append(f"{package}/{name}")
    return paths


def test_docs_architecture_names_every_module():
    documented = _documented_modules()
    actual = sorted(str(p.relative_to(PACKAGE)) for p in _modules())
    assert sorted(documented) == actual


def _unit(relative: str) -> str:
    return relative.split("/")[0].removesuffix(".py")


def test_imports_go_only_to_units_above_in_docs_architecture():
    order = []
    for path in _documented_modules():
        if _unit(path) not in order:
            order.append(_unit(path))
    offenders = []
    for path in _modules():
        relative = path.relative_to(PACKAGE)
        here = _unit(str(relative))
        if here == "__init__":  # the package root re-exports from below
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.ImportFrom) and node.level > 0):
                continue
            base = list(relative.parts[:-1])[:len(relative.parts) - node.level]
            target = (base + (node.module or "").split("."))[0] or node.names[0].name
            if target != here and order.index(target) > order.index(here):
                offenders.append(f"{relative} imports {target}")
    assert offenders == []


def _kind_name_comparisons(tree: ast.AST) -> list[int]:
    """Lines comparing something to a model kind's name (``x == "gvit"``, ``x in ("clip", ...)``)."""
    names, lines = set(MODELS), []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Compare):
            continue
        for side in [node.left, *node.comparators]:
            values = side.elts if isinstance(side, (ast.Tuple, ast.List, ast.Set)) else [side]
            if any(isinstance(v, ast.Constant) and v.value in names for v in values):
                lines.append(node.lineno)
    return lines


def test_no_module_outside_the_registry_compares_a_model_kind_to_a_string():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "kinds.py":
            continue
        offenders += [
            f"{path.relative_to(PACKAGE)}:{line}" for line in _kind_name_comparisons(ast.parse(path.read_text()))
        ]
    assert offenders == []
    assert _kind_name_comparisons(ast.parse('if cfg.model == "tokenizer": pass\nok = m in ("a", "clip")')) == [1, 2]
