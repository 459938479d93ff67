"""Loading refuses an incomplete or inconsistent checkpoint with an error naming the folder or file and the first
offending tensor, and every parameter is checked before any weight loads."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import tiny
import torch
from safetensors.torch import load_file, save_file

import mmflow.runs
import mmflow_utils as mu

WEIGHTS = "model.safetensors"


@pytest.fixture
def folder(tiny_dirs, tmp_path):
    copy = tmp_path / "ckpt"
    shutil.copytree(tiny_dirs["llava"], copy)
    return copy


@pytest.fixture
def no_weights_loaded(monkeypatch):
    """Fail the test if any weight would be loaded."""

    from transformers.modeling_utils import PreTrainedModel

    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(refuse))


def edit_tensors(folder: Path, change) -> None:
    tensors = load_file(folder / WEIGHTS)
    change(tensors)
    save_file(tensors, folder / WEIGHTS, metadata={"format": "pt"})


def key(tensors, suffix: str) -> str:
    return next(k for k in tensors if k.endswith(suffix))


def set_model_type(folder: Path, model_type: str) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": model_type}))


# ------------------------------------------------------------------------------------------------ strict loading


@pytest.mark.parametrize(
    "damage,message",
    [
        (
            lambda f: edit_tensors(f, lambda t: t.pop(key(t, "layers.1.mlp.down_proj.weight"))),
            r"lacks tensor model\.language_model\.layers\.1\.mlp\.down_proj\.weight, which "
            r"LlavaForConditionalGeneration needs",
        ),
        (
            lambda f: edit_tensors(f, lambda t: t.update({"model.extra.weight": torch.zeros(3)})),
            r"holds tensor model\.extra\.weight, which LlavaForConditionalGeneration does not have",
        ),
        (
            lambda f: edit_tensors(f, lambda t: t.update({key(t, "layers.1.mlp.down_proj.weight"): torch.zeros(5, 5)})),
            r"holds tensor model\.language_model\.layers\.1\.mlp\.down_proj\.weight \(checkpoint shape \[5, 5\], "
            r"model shape \[32, 64\]\) of the wrong shape",
        ),
        (
            lambda f: set_model_type(f, "llava_next"),
            r"lacks tensor model\.image_newline, which LlavaNextForConditionalGeneration needs",
        ),
    ],
    ids=["missing", "unexpected", "wrong shape", "llava as llava_next"],
)
def test_an_inconsistent_checkpoint_is_refused_naming_the_tensor(folder, damage, message):
    damage(folder)
    with pytest.raises(mu.MmflowError, match=message) as err:
        mu.load_model(str(folder))
    assert str(err.value).startswith(f"Checkpoint {folder} ")


def test_tied_and_complete_checkpoints_load_cleanly(tmp_path, loaded):
    """Tied embeddings (no lm_head tensor saved) and non-persistent buffers are not missing tensors."""
    tied = tiny.build_tiny(tmp_path / "tied", "llava", tie_word_embeddings=True)
    model, _ = mu.load_model(str(tied))
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    for name in ("llava", "llava_next", "llava_pad", "llava_sp"):
        loaded(name)
    mu.load_model("shapes-llava")


# ------------------------------------------------------------------------------------------------ file checks


def write_safetensors(path: Path, header, data: bytes = b"\0" * 16) -> None:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def entry(begin: int, end: int, **changes):
    return {"dtype": "F32", "shape": [(end - begin) // 4], "data_offsets": [begin, end], **changes}


@pytest.mark.parametrize(
    "header,message",
    [
        (b"{not json", "not JSON"),
        ([1, 2], "not a JSON object"),
        ({"a": {"dtype": "F32", "shape": [4]}}, "tensor 'a' lacks dtype, shape or data_offsets"),
        ({"a": "tensor"}, "tensor 'a' lacks dtype, shape or data_offsets"),
        ({"a": entry(0, 16, dtype="float32")}, "tensor 'a' has an unknown dtype 'float32'"),
        ({"a": entry(0, 16, shape="4")}, "tensor 'a' has a shape that is not a list of sizes"),
        ({"a": entry(0, 16, data_offsets=[0, "16"])}, "tensor 'a' has data_offsets that are not"),
        ({"a": entry(0, 16, data_offsets=[16, 0])}, "tensor 'a' has data_offsets that are not"),
        ({"a": entry(0, 8), "b": entry(4, 16)}, r"tensor 'b' at data offsets \[4, 16\] overlaps"),
        ({"a": entry(0, 8), "b": entry(12, 16)}, r"tensor 'b' at data offsets \[12, 16\] leaves bytes 8-12 unused"),
        ({"a": entry(0, 8)}, "its tensors end at byte 8 of the data, but 16 bytes follow"),
        ({"a": entry(0, 32)}, "is truncated: tensor 'a' ends at byte 32"),
    ],
)
def test_every_safetensors_header_problem_names_its_file(folder, no_weights_loaded, header, message):
    write_safetensors(folder / WEIGHTS, header)
    with pytest.raises(mu.MmflowError, match=message) as err:
        mu.Run.load(str(folder), cache_dir=str(folder.parent / "results"))
    assert f"Weight file {folder / WEIGHTS} " in str(err.value)


def test_an_unknown_model_type_is_named_with_its_file(folder, no_weights_loaded):
    set_model_type(folder, "llava_ultra")
    with pytest.raises(mu.MmflowError, match=r"config.json: model_type 'llava_ultra' is not a model type transformers"):
        mu.Run.load(str(folder), cache_dir=str(folder.parent / "results"))


@pytest.mark.parametrize("file", ["processor_config.json", "tokenizer_config.json", "generation_config.json"])
def test_auto_map_at_any_depth_is_refused_before_the_weights(folder, no_weights_loaded, file):
    path = folder / file
    content = json.loads(path.read_text()) if path.is_file() else {}
    content["image_processor"] = {"nested": [{"auto_map": {"AutoImageProcessor": "evil.Evil"}}]}
    path.write_text(json.dumps(content))
    with pytest.raises(mu.MmflowError, match=r"asks for custom code \(image_processor\.nested\[0\]\.auto_map\)"):
        mu.Run.load(str(folder), cache_dir=str(folder.parent / "results"))


# ------------------------------------------------------------------------------------------------ parameters first


def test_a_cache_that_is_not_a_writable_folder_fails_before_the_model_loads(tmp_path, no_weights_loaded):
    afile = tmp_path / "afile"
    afile.write_text("")
    with pytest.raises(mu.MmflowError, match=r"cache_dir '.*afile' \(.*\) is not a folder"):
        mu.Run.load("shapes-llava", cache_dir=str(afile))
    with pytest.raises(mu.MmflowError, match=r"cache_dir '.*afile/results' \(.*\) cannot be created: .*afile is not"):
        mu.Run.load("shapes-llava", cache_dir=str(afile / "results"))
    assert not (tmp_path / "new").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_cache_fails_before_the_model_loads(tmp_path, no_weights_loaded):
    (tmp_path / "ro").mkdir(mode=0o555)
    with pytest.raises(mu.MmflowError, match="cache_dir .* is not writable"):
        mu.Run.load("shapes-llava", cache_dir=str(tmp_path / "ro"))


def test_a_new_cache_folder_is_fine(tmp_path):
    assert mmflow.runs.check_writable_folder(tmp_path / "a" / "b", "cache_dir") == tmp_path / "a" / "b"
    assert not (tmp_path / "a").exists()  # nothing is created by the check


@pytest.mark.parametrize(
    "params,message",
    [
        ({"data": "/no/such/gqa"}, r"Data folder /no/such/gqa .* not found"),
        ({"data": "{tmp}", "images": "/no/such/images"}, r"images '/no/such/images' .* is not a folder"),
        ({"out_dir": "{tmp}/afile"}, r"out_dir '.*afile' .* is not a folder"),
        ({"cache_dir": "{tmp}/afile"}, r"cache_dir '.*afile' .* is not a folder"),
        ({"model": "./no/such/model"}, r"Model folder ./no/such/model .* not found"),
        ({"model": "{tmp}/afile"}, r"Model folder .*afile .* is a file, not a folder"),
    ],
)
def test_study_checks_every_parameter_before_the_weights(tmp_path, no_weights_loaded, params, message):
    (tmp_path / "afile").write_text("")
    params = {k: v.format(tmp=tmp_path) for k, v in params.items()}
    with pytest.raises(mu.MmflowError, match=message):
        mu.Study.from_params(**{"out_dir": str(tmp_path / "figs"), "cache_dir": str(tmp_path / "res"), **params})


def test_processors_are_built_without_importing_mistral_common():
    """Building a processor does not import mistral_common (and jsonschema, rfc3987_syntax: seconds per notebook
    kernel) unless the tokenizer is a Mistral one; the class check still refuses a wrong tokenizer, and the lookup
    is restored afterwards."""
    import os
    import subprocess
    import sys

    from transformers import CLIPImageProcessor, LlavaProcessor, processing_utils

    from mmflow.families import no_needless_mistral_import

    code = (
        "import sys, mmflow_utils as mu; mu.load_model('shapes-llava'); mu.load_model('shapes-qwen'); "
        "print('mistral_common' in sys.modules, 'jsonschema' in sys.modules)"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.split()[-2:] == ["False", "False"]
    before = processing_utils.ProcessorMixin.__dict__["get_possibly_dynamic_module"]
    class NotATokenizer:
        image_token = "<image>"

        def encode(self, text: str, **kwargs) -> list[int]:
            return [0]

    with pytest.raises(TypeError, match="tokenizer"), no_needless_mistral_import():
        LlavaProcessor(image_processor=CLIPImageProcessor(), tokenizer=NotATokenizer())
    assert processing_utils.ProcessorMixin.__dict__["get_possibly_dynamic_module"] is before
