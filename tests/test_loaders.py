"""SAE file formats written in their real layouts with random weights, read back with ``SAE.load``.

Each test computes the format's own encode rule by hand on the original tensors (in the file's
layout) and compares it with the loaded SAE.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from guardrails.sae.loaders import SAEFormat, known_formats, load_sae, register_format
from guardrails.sae.model import SAE, SAEError
from tests.builders import qwen_scope_encode, qwen_scope_tensors, random_sae, write_qwen_scope

D_MODEL, D_SAE = 48, 160


def _x(n: int = 10, d: int = D_MODEL) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(3)) * 2


def _topk_relu(pre: torch.Tensor, k: int) -> torch.Tensor:
    v, i = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, i, torch.relu(v))


# -- offline ---------------------------------------------------------------------------------------------


def test_session_is_offline() -> None:
    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["TRANSFORMERS_OFFLINE"] == "1"
    with pytest.raises(OSError, match="network access is blocked"):
        socket.create_connection(("127.0.0.1", 9), timeout=1)


# -- Qwen-Scope ----------------------------------------------------------------------------------------


def test_qwen_scope_file(tmp_path: Path) -> None:
    t = qwen_scope_tensors(D_MODEL, D_SAE, seed=1)
    path = write_qwen_scope(tmp_path, 7, t)
    raw = torch.load(path, weights_only=True)
    assert raw["W_enc"].shape == (D_SAE, D_MODEL) and raw["W_dec"].shape == (D_MODEL, D_SAE)
    sae = SAE.load(path, k=12)
    assert sae.cfg.source_format == "qwen-scope" and sae.cfg.layer == 7 and sae.k == 12
    x = _x()
    acts = sae.encode(x)
    torch.testing.assert_close(acts, qwen_scope_encode(x, t, 12))
    # decode with the file's own layout: x_hat = acts @ W_dec.T + b_dec
    torch.testing.assert_close(sae.decode(acts), acts @ t["W_dec"].T + t["b_dec"], rtol=1e-5, atol=1e-5)


def test_qwen_scope_folder_plus_layer(tmp_path: Path) -> None:
    ts = {n: qwen_scope_tensors(D_MODEL, D_SAE, seed=n) for n in (3, 4)}
    for n, t in ts.items():
        write_qwen_scope(tmp_path, n, t)
    x = _x()
    for n, t in ts.items():
        sae = SAE.load(tmp_path, layer=n, k=5)
        assert sae.cfg.layer == n
        torch.testing.assert_close(sae.encode(x), qwen_scope_encode(x, t, 5))
    with pytest.raises(SAEError, match=r"needs layer=.*layer3\.sae\.pt.*layer4\.sae\.pt"):
        SAE.load(tmp_path, k=5)
    with pytest.raises(SAEError, match=r"no layer9\.sae\.pt.*layer3\.sae\.pt"):
        SAE.load(tmp_path, layer=9, k=5)


def test_qwen_scope_needs_k(tmp_path: Path) -> None:
    path = write_qwen_scope(tmp_path, 2, qwen_scope_tensors(D_MODEL, D_SAE))
    with pytest.raises(SAEError, match=r"layer2\.sae\.pt.*pass k="):
        SAE.load(path)


def test_qwen_scope_dtype_and_device(tmp_path: Path) -> None:
    t = qwen_scope_tensors(D_MODEL, D_SAE)
    sae = SAE.load(write_qwen_scope(tmp_path, 0, t), k=8, dtype="bf16", device="cpu")
    assert sae.dtype == torch.bfloat16 and sae.device.type == "cpu"
    assert torch.equal(sae.W_enc.float(), t["W_enc"].bfloat16().float())


class _RunsCode:
    """Pickles to a call of ``os.system`` that creates a marker file when unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def test_qwen_scope_pickle_cannot_run_code(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    t: dict[str, Any] = dict(qwen_scope_tensors(D_MODEL, D_SAE))
    t["W_enc"] = _RunsCode(marker)
    path = tmp_path / "layer1.sae.pt"
    torch.save(t, path)
    with pytest.raises(SAEError, match=r"layer1\.sae\.pt.*weights_only=True"):
        SAE.load(path, k=8)
    assert not marker.exists()
    # control: the file really does run code when unpickled without weights_only
    torch.load(path, weights_only=False)
    assert marker.exists()


# -- SAELens ---------------------------------------------------------------------------------------------


def _saelens_tensors(seed: int = 0, jumprelu: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    t = {
        "W_enc": torch.randn(D_MODEL, D_SAE, generator=g) / D_MODEL**0.5,  # [d_in, d_sae]
        "W_dec": torch.randn(D_SAE, D_MODEL, generator=g) / D_SAE**0.5,  # [d_sae, d_in]
        "b_enc": torch.randn(D_SAE, generator=g) * 0.3,
        "b_dec": torch.randn(D_MODEL, generator=g) * 0.3,
    }
    if jumprelu:
        t["threshold"] = torch.rand(D_SAE, generator=g) * 0.8
    return t


def _write_saelens(folder: Path, cfg: dict[str, Any], t: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file(t, str(folder / "sae_weights.safetensors"))
    return folder


def _saelens_v6_cfg(architecture: str, **extra: Any) -> dict[str, Any]:
    """``cfg.json`` as SAELens 6 writes it (``meta`` nested)."""
    return {
        "d_in": D_MODEL, "d_sae": D_SAE, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
        "normalize_activations": "none", "reshape_activations": "none",
        "meta": {"model_name": "tiny-llama", "hook_name": "blocks.5.hook_resid_post", "hook_layer": 5,
                 "hook_head_index": None, "prepend_bos": True, "context_size": 128, "dataset_path": "x",
                 "sae_lens_version": "6.12.1", "sae_lens_training_version": "6.12.1"},
        "architecture": architecture, **extra,
    }


def _saelens_v5_cfg(architecture: str, **extra: Any) -> dict[str, Any]:
    """``cfg.json`` as SAELens 5 and the pretrained releases write it (flat)."""
    return {
        "architecture": architecture, "d_in": D_MODEL, "d_sae": D_SAE, "dtype": "float32", "device": "cpu",
        "model_name": "tiny-llama", "hook_name": "blocks.5.hook_resid_post", "hook_layer": 5,
        "hook_head_index": None, "activation_fn_str": "relu", "activation_fn_kwargs": {},
        "apply_b_dec_to_input": False, "finetuning_scaling_factor": False, "sae_lens_training_version": "5.3.0",
        "prepend_bos": True, "dataset_path": "x", "context_size": 1024, "normalize_activations": "none",
        **extra,
    }


def test_saelens_standard(tmp_path: Path) -> None:
    t = _saelens_tensors()
    sae = SAE.load(_write_saelens(tmp_path / "std", _saelens_v6_cfg("standard"), t))
    assert sae.cfg.source_format == "saelens" and sae.cfg.architecture == "relu"
    assert sae.cfg.layer == 5 and sae.cfg.model == "tiny-llama"
    x = _x()
    pre = (x - t["b_dec"]) @ t["W_enc"] + t["b_enc"]  # SAELens: x - b_dec when apply_b_dec_to_input
    torch.testing.assert_close(sae.encode(x), torch.relu(pre))
    acts = sae.encode(x)
    torch.testing.assert_close(sae.decode(acts), acts @ t["W_dec"] + t["b_dec"], rtol=1e-5, atol=1e-5)


def test_saelens_v5_standard_without_b_dec_input(tmp_path: Path) -> None:
    t = _saelens_tensors(seed=2)
    sae = SAE.load(_write_saelens(tmp_path / "v5", _saelens_v5_cfg("standard"), t))
    assert sae.cfg.layer == 5
    x = _x()
    torch.testing.assert_close(sae.encode(x), torch.relu(x @ t["W_enc"] + t["b_enc"]))


def test_saelens_jumprelu(tmp_path: Path) -> None:
    t = _saelens_tensors(jumprelu=True)
    sae = SAE.load(_write_saelens(tmp_path / "jr", _saelens_v6_cfg("jumprelu"), t))
    assert sae.cfg.architecture == "jumprelu"
    x = _x()
    pre = (x - t["b_dec"]) @ t["W_enc"] + t["b_enc"]
    expected = torch.relu(pre) * (pre > t["threshold"])  # SAELens JumpReLU
    torch.testing.assert_close(sae.encode(x), expected)
    assert (expected != 0).any()


@pytest.mark.parametrize("version", ["v6", "v5"])
def test_saelens_topk(tmp_path: Path, version: str) -> None:
    t = _saelens_tensors(seed=4)
    if version == "v6":
        cfg = _saelens_v6_cfg("topk", k=9)
    else:  # SAELens 5: a "standard" SAE whose activation function is topk
        cfg = _saelens_v5_cfg("standard", activation_fn_str="topk", activation_fn_kwargs={"k": 9},
                              apply_b_dec_to_input=True)
    sae = SAE.load(_write_saelens(tmp_path / version, cfg, t))
    assert sae.cfg.architecture == "topk" and sae.k == 9
    x = _x()
    pre = (x - t["b_dec"]) @ t["W_enc"] + t["b_enc"]
    torch.testing.assert_close(sae.encode(x), _topk_relu(pre, 9))  # SAELens TopK: ReLU on the kept values


def test_saelens_unsupported_settings_are_refused(tmp_path: Path) -> None:
    t = _saelens_tensors()
    with pytest.raises(SAEError, match=r"cfg\.json.*'gated'.*valid: standard"):
        SAE.load(_write_saelens(tmp_path / "g", _saelens_v6_cfg("gated"), t))
    with pytest.raises(SAEError, match=r"cfg\.json.*normalize_activations='layer_norm'"):
        SAE.load(_write_saelens(tmp_path / "n", _saelens_v6_cfg("standard", normalize_activations="layer_norm"), t))
    with pytest.raises(SAEError, match=rf"cfg\.json.*d_sae=7.*\({D_MODEL}, {D_SAE}\)"):
        SAE.load(_write_saelens(tmp_path / "d", {**_saelens_v6_cfg("standard"), "d_sae": 7}, t))


# -- sparsify ----------------------------------------------------------------------------------------------


def _sparsify_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "encoder.weight": torch.randn(D_SAE, D_MODEL, generator=g) / D_MODEL**0.5,  # nn.Linear(d_in, n)
        "encoder.bias": torch.randn(D_SAE, generator=g) * 0.3 - 0.5,
        "W_dec": torch.randn(D_SAE, D_MODEL, generator=g) / D_SAE**0.5,
        "b_dec": torch.randn(D_MODEL, generator=g) * 0.3,
    }


def _write_sparsify(folder: Path, t: dict[str, torch.Tensor], **cfg: Any) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    conf = {"activation": "topk", "expansion_factor": 32, "normalize_decoder": True, "num_latents": D_SAE,
            "k": 10, "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": D_MODEL, **cfg}
    (folder / "cfg.json").write_text(json.dumps(conf))
    save_file(t, str(folder / "sae.safetensors"))
    return folder


def test_sparsify(tmp_path: Path) -> None:
    t = _sparsify_tensors()
    sae = SAE.load(_write_sparsify(tmp_path / "layers.3", t))
    assert sae.cfg.source_format == "sparsify" and sae.k == 10
    x = _x()
    # sparsify: relu((x - b_dec) @ encoder.weight.T + encoder.bias), then top k
    pre = torch.relu((x - t["b_dec"]) @ t["encoder.weight"].T + t["encoder.bias"])
    v, i = pre.topk(10, dim=-1)
    expected = torch.zeros_like(pre).scatter(-1, i, v)
    acts = sae.encode(x)
    torch.testing.assert_close(acts, expected)
    top = sae.encode_sparse(x)
    torch.testing.assert_close(top.values, v)
    # decode: sum of W_dec rows of the active latents + b_dec
    dec = torch.stack([(v[n, :, None] * t["W_dec"][i[n]]).sum(0) for n in range(len(x))]) + t["b_dec"]
    torch.testing.assert_close(sae.decode(acts), dec, rtol=1e-5, atol=1e-5)


def test_sparsify_transcoder_does_not_subtract_b_dec(tmp_path: Path) -> None:
    t = _sparsify_tensors(seed=1)
    sae = SAE.load(_write_sparsify(tmp_path / "tc", t, transcode=True))
    x = _x()
    pre = torch.relu(x @ t["encoder.weight"].T + t["encoder.bias"])
    v, i = pre.topk(10, dim=-1)
    torch.testing.assert_close(sae.encode(x), torch.zeros_like(pre).scatter(-1, i, v))


def test_sparsify_refusals(tmp_path: Path) -> None:
    t = _sparsify_tensors()
    with pytest.raises(SAEError, match=r"cfg\.json.*'groupmax'.*valid: topk"):
        SAE.load(_write_sparsify(tmp_path / "gm", t, activation="groupmax"))
    with pytest.raises(SAEError, match=r"cfg\.json.*no 'k'"):
        SAE.load(_write_sparsify(tmp_path / "nok", t, k=None))
    # k= overrides a missing k
    assert SAE.load(tmp_path / "nok", k=3).k == 3


# -- our own format ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["topk", "jumprelu", "relu"])
def test_save_load_round_trip(tmp_path: Path, arch: str) -> None:
    sae = random_sae(d_model=D_MODEL, d_sae=D_SAE, k=7, layer=4, architecture=arch)
    folder = sae.save(tmp_path / "ours")
    assert json.loads((folder / "cfg.json").read_text())["format"] == "sae-guardrails"
    back = SAE.load(folder)
    assert back.cfg.source_format == "guardrails"
    assert (back.cfg.architecture, back.k, back.cfg.layer, back.d_model, back.d_sae) == (arch, sae.k, 4, D_MODEL, D_SAE)
    for name, tensor in sae.tensors().items():
        assert torch.equal(back.tensors()[name], tensor), name
    x = _x()
    torch.testing.assert_close(back.encode(x), sae.encode(x))


def test_save_half_precision(tmp_path: Path) -> None:
    sae = random_sae(d_model=D_MODEL, d_sae=D_SAE, k=7)
    back = SAE.load(sae.save(tmp_path / "h", dtype=torch.float16), dtype="float16")
    assert back.dtype == torch.float16
    assert torch.equal(back.W_enc, sae.W_enc.half())


# -- bad files ---------------------------------------------------------------------------------------------


def test_truncated_pt(tmp_path: Path) -> None:
    path = write_qwen_scope(tmp_path, 0, qwen_scope_tensors(D_MODEL, D_SAE))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(SAEError, match=rf"{path.name}.*not a loadable Qwen-Scope"):
        SAE.load(path, k=4)


def test_truncated_safetensors(tmp_path: Path) -> None:
    folder = _write_saelens(tmp_path / "s", _saelens_v6_cfg("standard"), _saelens_tensors())
    f = folder / "sae_weights.safetensors"
    f.write_bytes(f.read_bytes()[:200])
    with pytest.raises(SAEError, match=r"sae_weights\.safetensors.*cannot read"):
        SAE.load(folder)


def test_qwen_scope_wrong_shapes(tmp_path: Path) -> None:
    t = qwen_scope_tensors(D_MODEL, D_SAE)
    t["W_dec"] = t["W_dec"].T.contiguous()  # SAELens orientation in a Qwen-Scope file
    path = write_qwen_scope(tmp_path, 0, t)
    with pytest.raises(SAEError, match=rf"layer0\.sae\.pt.*W_dec.*\({D_SAE}, {D_MODEL}\).*\[d_model, d_sae\]"):
        SAE.load(path, k=4)


def test_missing_tensor(tmp_path: Path) -> None:
    t = qwen_scope_tensors(D_MODEL, D_SAE)
    del t["b_enc"]
    with pytest.raises(SAEError, match=r"layer0\.sae\.pt.*missing tensors \['b_enc'\]"):
        SAE.load(write_qwen_scope(tmp_path, 0, t), k=4)


@pytest.mark.parametrize("fmt", ["qwen-scope", "saelens", "guardrails"])
def test_nan_weights(tmp_path: Path, fmt: str) -> None:
    if fmt == "qwen-scope":
        t = qwen_scope_tensors(D_MODEL, D_SAE)
        t["b_enc"][3] = float("nan")
        path = write_qwen_scope(tmp_path, 0, t)
    elif fmt == "saelens":
        t = _saelens_tensors()
        t["b_enc"][3] = float("nan")
        path = _write_saelens(tmp_path / "s", _saelens_v6_cfg("standard"), t)
    else:
        sae = random_sae(d_model=D_MODEL, d_sae=D_SAE)
        sae.b_enc.data[3] = float("nan")
        path = sae.save(tmp_path / "o")
    with pytest.raises(SAEError, match=rf"{path.name}.*b_enc contains NaN"):
        SAE.load(path, k=4)


def test_unknown_folder_lists_the_known_formats(tmp_path: Path) -> None:
    folder = tmp_path / "mystery"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(b"\0" * 16)
    with pytest.raises(SAEError, match="unrecognised SAE format") as info:
        SAE.load(folder)
    msg = str(info.value)
    assert str(folder) in msg
    for name in ("qwen-scope", "saelens", "sparsify", "guardrails"):
        assert name in msg
    assert set(known_formats()) >= {"qwen-scope", "saelens", "sparsify", "guardrails"}


def test_missing_path_and_unknown_format_name(tmp_path: Path) -> None:
    with pytest.raises(SAEError, match=r"does not exist.*'bundled'.*hf://"):
        SAE.load(tmp_path / "nope")
    path = write_qwen_scope(tmp_path, 0, qwen_scope_tensors(D_MODEL, D_SAE))
    with pytest.raises(SAEError, match=r"unknown SAE format 'npz'; valid: .*qwen-scope"):
        SAE.load(path, k=4, format="npz")


def test_registry_rejects_duplicate_names() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_format(SAEFormat("saelens", "again", lambda p, layer: False, load_sae))


# -- hub (never the network: the download is replaced by a local file) -----------------------------------


def test_from_hub_uses_huggingface_hub_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    t = qwen_scope_tensors(D_MODEL, D_SAE, seed=9)
    local = write_qwen_scope(tmp_path, 12, t)
    calls: list[tuple[Any, ...]] = []

    def fake_download(repo_id: str, filename: str, **kw: Any) -> str:
        calls.append((repo_id, filename, kw.get("revision")))
        return str(local)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    repo = "Qwen/SAE-Res-Qwen3-8B-Base-W64K-L0_50"
    sae = SAE.from_hub(repo, layer=12)
    assert calls == [(repo, "layer12.sae.pt", None)]
    assert sae.k == 50 and sae.cfg.layer == 12  # k from the repo name's L0_50
    x = _x()
    torch.testing.assert_close(sae.encode(x), qwen_scope_encode(x, t, 50))

    sae2 = SAE.load(f"hf://{repo}", layer=12, k=20)
    assert calls[-1] == (repo, "layer12.sae.pt", None) and sae2.k == 20
    with pytest.raises(SAEError, match="needs layer="):
        SAE.load(f"hf://{repo}")
    with pytest.raises(SAEError, match="L0_<k>"):
        SAE.from_hub("someone/my-sae", layer=12)
