"""One folder per model family: every folder's presets are a registered family and the reverse, and a
presets file that names a field ModelConfig lacks is refused (a typo would otherwise be ignored)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from r1mega.config import presets
from r1mega.models import registry


def test_every_family_folder_is_registered_and_has_presets():
    folders = {p.parent.name for p in presets.FAMILIES_DIR.glob("*/presets.yaml")}
    assert folders == set(registry.FAMILIES) == set(presets.PRESETS)
    for name, fam in registry.FAMILIES.items():
        assert fam.architecture.preset == name
        assert registry.family_for_model_type(fam.architecture.model_type) is fam
        assert "tiny" in presets.PRESETS[name]
    types = [t for fam in registry.FAMILIES.values() for t in fam.model_types]
    assert len(types) == len(set(types)), "two families claim one HF model_type"


def test_dense_and_moe_presets_agree_with_num_experts():
    for name, sizes in presets.PRESETS.items():
        for size, values in sizes.items():
            assert bool(values.get("num_experts")) == (not presets.is_dense_preset(name)), (name, size)


@pytest.mark.parametrize("text,match", [
    ("kind: moe\nsizes:\n  tiny: {num_layer: 2}\n", r"num_layer"),
    ("kind: sparse\nsizes:\n  tiny: {num_layers: 2}\n", "kind"),
])
def test_a_bad_presets_file_is_refused_by_name(tmp_path, text, match):
    path = tmp_path / "fam" / "presets.yaml"
    path.parent.mkdir()
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        presets._load_family(path)


@pytest.mark.parametrize("recipe,nodes,layout,model", [
    ("r1_zero_deepseek_v2_lite.yaml", 2, "tp=2 pp=1 ep=8 etp=1 dp=8", "deepseek_v2/lite"),
    ("r1_zero_moonlight_16b_a3b.yaml", 2, "tp=2 pp=1 ep=8 etp=1 dp=8", "deepseek_v3/moonlight_16b_a3b"),
    ("r1_zero_glm45_air.yaml", 8, "tp=2 pp=4 ep=16 etp=1 dp=8", "glm4_moe/glm45_air"),
    ("r1_zero_gpt_oss_20b.yaml", 2, "tp=2 pp=1 ep=8 etp=1 dp=8", "gpt_oss/20b"),
])
def test_family_recipe_validates_for_its_cluster(recipe, nodes, layout, model, tmp_path):
    """Each new family's R1-Zero recipe is a valid job at its node count: the launcher's dry run validates it
    and resolves the layout and model the recipe names."""
    repo = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "-m", "launch.slurm", str(repo / "configs" / recipe), "--nodes", str(nodes),
                           "--dry-run", "--output-dir", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120, cwd=repo)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"# layout: {layout}" in proc.stdout and f"model {model}" in proc.stdout
