"""swarm-export: our models as transformers Llama / Mixtral, checked by loading them with transformers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from models import LanguageModel, generate, get_preset
from swarm.data import DataConfig
from swarm.data.tokenizer import BPETokenizer, ByteTokenizer, TokenizerError, train_bpe
from swarm.export import ExportError, load_source, write_hf_folder
from swarm.export.hf import hf_tensors, rope_permutation
from swarm.export.verify import FP32_TOLERANCE, verify_export

transformers = pytest.importorskip("transformers")

SMALL = dict(n_layers=2, max_seq_len=64)
PROMPT = "def main(argv):\n"


def _model(preset: str, **overrides: object) -> LanguageModel:
    model = LanguageModel(get_preset(preset, **SMALL, **overrides), seed=3).eval()
    with torch.no_grad():  # norm gains away from 1, so a gain sent to the wrong place shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    return model


def _greedy_both(model: LanguageModel, hf: torch.nn.Module, prompt: torch.Tensor, new: int) -> tuple[list[int], list[int]]:
    ours = generate(model, prompt, new, temperature=0.0)[0].tolist()
    theirs = hf.generate(prompt, max_new_tokens=new, do_sample=False, attention_mask=torch.ones_like(prompt))[0].tolist()  # type: ignore[operator]
    return ours, theirs


@pytest.mark.parametrize(
    "preset,architecture",
    [("nano", "LlamaForCausalLM"), ("moe-nano", "MixtralForCausalLM"), ("nano-tied", "LlamaForCausalLM")],
)
def test_round_trip_logits_and_generate(tmp_path: Path, preset: str, architecture: str) -> None:
    model = _model("nano", tie_embeddings=True) if preset == "nano-tied" else _model(preset)
    out = write_hf_folder(tmp_path / "hf", cfg=model.cfg, params=model.state_dict(), tokenizer=ByteTokenizer())
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [architecture]
    assert config["tie_word_embeddings"] == model.cfg.tie_embeddings

    check = verify_export(out, model)
    assert check.architecture == architecture
    assert check.max_abs_diff <= FP32_TOLERANCE, check  # about 4e-7 observed; logits are O(1)
    assert check.max_abs_logit > 0.1  # a model that outputs zeros would pass trivially

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    ids = tok(PROMPT, return_tensors="pt").input_ids
    assert ids[0].tolist() == ByteTokenizer().encode(PROMPT).tolist()  # same ids as our tokenizer
    ours, theirs = _greedy_both(model, hf, ids, 12)
    assert theirs == ours  # greedy decoding picks the same tokens
    text = tok.decode(theirs, skip_special_tokens=True)
    assert text.startswith(PROMPT) and len(text.encode()) > len(PROMPT.encode())


def test_rope_permutation_puts_even_channels_first() -> None:
    assert rope_permutation(6).tolist() == [0, 2, 4, 1, 3, 5]
    model = _model("nano")
    tensors = hf_tensors(model.cfg, model.state_dict())
    q = model.state_dict()["blocks.0.attn.qkv.weight"][: model.cfg.d_model]
    hd = model.cfg.head_dim
    assert torch.equal(tensors["model.layers.0.self_attn.q_proj.weight"][hd // 2], q[1])  # head 0, first odd channel
    assert torch.equal(
        tensors["model.layers.0.self_attn.v_proj.weight"], model.state_dict()["blocks.0.attn.qkv.weight"][2 * model.cfg.d_model :]
    )


def test_wrong_tensors_are_refused(tmp_path: Path) -> None:
    model = _model("nano")
    params = model.state_dict()
    del params["norm.weight"]
    with pytest.raises(ExportError, match=r"missing \['norm.weight'\]"):
        write_hf_folder(tmp_path / "hf", cfg=model.cfg, params=params, tokenizer=ByteTokenizer())
    assert not (tmp_path / "hf").exists()


def _bpe(tmp_path: Path) -> tuple[Path, BPETokenizer]:
    texts = [f"def function_{i}(value):\n    return value * {i} + len('text {i}')\n" for i in range(200)]
    tok = train_bpe(iter(texts), vocab_size=300)
    path = tmp_path / "tokenizer.json"
    path.write_text(tok.to_json())
    (tmp_path / "corpus.txt").write_text("".join(texts))
    return path, tok


def test_solo_checkpoint_with_bpe_exports_through_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from launch.export import main
    from swarm.train.solo import TrainConfig, run_solo

    tok_path, tok = _bpe(tmp_path)
    cfg = TrainConfig(
        model_overrides=dict(d_model=32, n_heads=2, n_layers=2, d_ff=64, max_seq_len=64),
        data=DataConfig(source=str(tmp_path / "corpus.txt"), eval_fraction=0.1),
        tokenizer=str(tok_path),
        batch_size=2,
        seq_len=32,
        steps=3,
        eval_every=0,
        out_dir=str(tmp_path / "run"),
        device="cpu",
    )
    run_solo(cfg, progress=False)
    tok_path.unlink()  # the checkpoint carries its own copy of the tokenizer
    assert main([str(tmp_path / "run"), str(tmp_path / "hf"), "--check"]) == 0
    printed = capsys.readouterr().out
    assert "LlamaForCausalLM" in printed and "bpe tokenizer of 300 ids" in printed and "(ok)" in printed
    config = json.loads((tmp_path / "hf/config.json").read_text())
    assert config["vocab_size"] == 300 and config["eos_token_id"] == tok.eos_id
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert hf_tok("return value").input_ids == tok.encode("return value").tolist()
    assert hf_tok.eos_token_id == tok.eos_id


def _swarm_state_dir(tmp_path: Path, tokenizer_sha256: str = "", vocab: int | None = None) -> Path:
    from swarm.modes.replica import initial_state
    from swarm.net.schema import to_plain
    from swarm.run import RunConfig
    from swarm.state import save_state

    overrides: dict[str, int | float | bool] = dict(SMALL)
    if vocab is not None:
        overrides["vocab_size"] = vocab
    run = RunConfig(
        run_id="run-export",
        preset="moe-nano",
        model_overrides=overrides,
        tokenizer_sha256=tokenizer_sha256,
        tokenizer_bytes=1000 if tokenizer_sha256 else 0,
    )
    state = initial_state(run)
    state.round = 7
    state_dir = tmp_path / "coordinator"
    save_state(state, state_dir / "state", run_id=run.run_id)
    (state_dir / "run.json").write_text(json.dumps(to_plain(run)))
    return state_dir


def test_swarm_saved_state_exports_as_mixtral(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from launch.export import main

    state_dir = _swarm_state_dir(tmp_path)
    source = load_source(state_dir)
    assert source.provenance["round"] == 7 and source.cfg.is_moe
    # the saved state directory itself works too (its run.json is found in the parent)
    assert load_source(state_dir / "state").provenance["state_hash"] == source.provenance["state_hash"]
    assert main([str(state_dir), str(tmp_path / "hf"), "--check"]) == 0
    assert "MixtralForCausalLM" in capsys.readouterr().out
    provenance = json.loads((tmp_path / "hf/swarm_export.json").read_text())
    assert provenance["run_id"] == "run-export" and provenance["round"] == 7


def test_tokenizer_of_another_run_is_refused(tmp_path: Path) -> None:
    tok_path, tok = _bpe(tmp_path)
    other = tmp_path / "other.json"
    other.write_text(ByteTokenizer().to_json())
    state_dir = _swarm_state_dir(tmp_path, tokenizer_sha256=tok.sha256, vocab=tok.vocab_size)
    source = load_source(state_dir)
    with pytest.raises(TokenizerError, match=r"no tokenizer.json was found.*--tokenizer"):
        source.tokenizer()  # not in the coordinator's state dir
    with pytest.raises(
        TokenizerError, match=rf"run uses sha256 {tok.sha256}.*peer has sha256 {BPETokenizer.from_file(other).sha256}"
    ):
        source.tokenizer(other)
    assert source.tokenizer(tok_path).sha256 == tok.sha256


def test_unknown_source_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="nothing to export"):
        load_source(tmp_path / "missing")
    with pytest.raises(ExportError, match="neither a solo checkpoint"):
        load_source(tmp_path)
