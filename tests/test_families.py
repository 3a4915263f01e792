"""One folder per model family: every folder's presets are a registered family and the reverse, and a
presets file that names a field ModelConfig lacks is refused (a typo would otherwise be ignored)."""

from __future__ import annotations

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
