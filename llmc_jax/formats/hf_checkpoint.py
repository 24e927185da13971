"""Hugging Face checkpoint directories (config.json + safetensors) in and out, for GPT-2 and Llama 3.

A directory as `save_pretrained` writes it: config.json, then model.safetensors or shards listed in
model.safetensors.index.json. Reading gives the same (config, float32 params) as an llm.c .bin, so
every command that takes `-e` takes a directory; writing gives what `from_pretrained` loads.

The layouts differ from llm.c's in three places:
- GPT-2's Conv1D stores weights (in, out); llm.c (and nn.Linear) store (out, in): transposed. HF keeps
  V rows of the embedding, llm.c pads to Vp (zero rows, a multiple of 128); the head is tied.
- Llama's q and k: Meta (and llm.c) rotate interleaved channel pairs (2i, 2i+1); HF's rotate_half
  pairs channel i with i + HS/2, so its conversion script permuted the rows of q_proj and k_proj per
  head: HF row j*HS/2 + i is Meta row 2i + j. `_to_interleaved` undoes that, `_to_half` redoes it.
- Llama's separate projections are fused as llm.c's: qkvw = [q; k; v], fcw = [up; gate].
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from llmc_jax.formats.llmc_format import LLMCFormatError, atomic_write
from llmc_jax.formats.safetensors_io import SafetensorsFile, write_file
from llmc_jax.models.config import GPTConfig
from llmc_jax.models.llama_config import LlamaConfig

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
GPT2_EOT, LLAMA3_BOS, LLAMA3_EOS = 50256, 128000, 128001


def is_hf_dir(path: str | os.PathLike) -> bool:
    return os.path.isdir(path) and os.path.exists(os.path.join(path, "config.json"))


def _error(path: str, why: str) -> LLMCFormatError:
    return LLMCFormatError(f"{path}: {why}")


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _error(path, f"not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise _error(path, "not a JSON object")
    return data


# ---------------------------------------------------------------- configs

def _get(cfg: dict, path: str, key: str, kind: type = int) -> Any:
    if key not in cfg:
        raise _error(path, f"config.json has no {key!r}")
    value = cfg[key]
    if kind is int and not (isinstance(value, int) and not isinstance(value, bool)) or \
       kind is float and not (isinstance(value, (int, float)) and not isinstance(value, bool)):
        raise _error(path, f"config.json {key} = {value!r} is not {'an integer' if kind is int else 'a number'}")
    return value


def _require(path: str, ok: bool, what: str) -> None:
    if not ok:
        raise _error(path, f"config.json: {what}; llmc-jax's model computes a different function")


def _gpt2_config(path: str, cfg: dict) -> GPTConfig:
    C, V = _get(cfg, path, "n_embd"), _get(cfg, path, "vocab_size")
    _require(path, cfg.get("activation_function", "gelu_new") in ("gelu_new", "gelu_pytorch_tanh"),
             f"activation_function {cfg.get('activation_function')!r} is not GPT-2's tanh GELU (gelu_new)")
    _require(path, cfg.get("n_inner") in (None, 4 * C), f"n_inner {cfg.get('n_inner')} is not 4 * n_embd")
    _require(path, abs(float(cfg.get("layer_norm_epsilon", 1e-5)) - 1e-5) < 1e-12,
             f"layer_norm_epsilon {cfg.get('layer_norm_epsilon')} is not llm.c's 1e-5")
    _require(path, cfg.get("scale_attn_weights", True) and not cfg.get("scale_attn_by_inverse_layer_idx", False),
             "attention scaling is not 1/sqrt(head size)")
    _require(path, cfg.get("tie_word_embeddings", True), "tie_word_embeddings is false (GPT-2's head is tied)")
    try:
        return GPTConfig(L=_get(cfg, path, "n_layer"), NH=_get(cfg, path, "n_head"), C=C,
                         maxT=_get(cfg, path, "n_positions"), V=V, Vp=-(-V // 128) * 128)
    except ValueError as e:
        raise _error(path, f"config.json sizes: {e}") from None


def _rope_settings(path: str, cfg: dict) -> dict:
    """HF's RoPE settings (transformers 5's rope_parameters, or 4's rope_theta + rope_scaling)."""
    params = dict(cfg.get("rope_parameters") or {})
    scaling = params if params else dict(cfg.get("rope_scaling") or {})
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    out: dict[str, Any] = {"rope_theta": float(theta), "use_scaled_rope": kind == "llama3"}
    if kind == "llama3":
        out.update(rope_factor=float(scaling["factor"]), rope_low_freq_factor=float(scaling["low_freq_factor"]),
                   rope_high_freq_factor=float(scaling["high_freq_factor"]),
                   rope_original_maxT=int(scaling["original_max_position_embeddings"]))
    elif kind != "default":
        raise _error(path, f"config.json: RoPE type {kind!r} is not supported (Llama 3's 'llama3' or 'default')")
    return out


def _mlp_width(C: int, hidden: int) -> dict:
    """multiple_of and ffn_dim_multiplier that make LlamaConfig.hidden the checkpoint's intermediate_size
    (Meta's own values first: 1024 and 256 with the multiplier that rounds up to it)."""
    base = int(2 * (4 * C) / 3)
    for multiple_of in (1024, 256, hidden):
        if hidden % multiple_of:
            continue
        for mult in (None, round(hidden / base, 4), hidden / base):
            sizes = dict(multiple_of=multiple_of, ffn_dim_multiplier=mult)
            if LlamaConfig(L=1, NH=1, NKV=1, C=C, **sizes).hidden == hidden:
                return sizes
    raise ValueError(f"no Meta MLP sizing gives intermediate_size {hidden} for hidden_size {C}")


def _llmc_sizes(cfg: dict, C: int, hidden: int, hf_maxT: int) -> dict:
    """maxT and Meta's MLP sizing: the llmc_* keys our export records beside HF's (llm.c's header
    holds them, HF's config has no place for them), where they agree with HF's sizes; else derived."""
    sizes = {"maxT": int(cfg.get("llmc_max_seq_len", hf_maxT))}
    mine = {"multiple_of": cfg.get("llmc_multiple_of"), "ffn_dim_multiplier": cfg.get("llmc_ffn_dim_multiplier")}
    if mine["multiple_of"] and LlamaConfig(L=1, NH=1, NKV=1, C=C, **mine).hidden == hidden:
        return {**sizes, **mine}
    return {**sizes, **_mlp_width(C, hidden)}


def _llama_config(path: str, cfg: dict) -> LlamaConfig:
    C, NH = _get(cfg, path, "hidden_size"), _get(cfg, path, "num_attention_heads")
    _require(path, cfg.get("hidden_act", "silu") == "silu", f"hidden_act {cfg.get('hidden_act')!r} is not silu")
    _require(path, not cfg.get("attention_bias") and not cfg.get("mlp_bias"), "the projections have biases")
    _require(path, cfg.get("head_dim") in (None, C // NH), f"head_dim {cfg.get('head_dim')} is not hidden_size / heads")
    try:
        sizes = _llmc_sizes(cfg, C, _get(cfg, path, "intermediate_size"), _get(cfg, path, "max_position_embeddings"))
        return LlamaConfig(L=_get(cfg, path, "num_hidden_layers"), NH=NH, NKV=cfg.get("num_key_value_heads") or NH,
                           C=C, V=_get(cfg, path, "vocab_size"), norm_eps=float(_get(cfg, path, "rms_norm_eps", float)),
                           tied=bool(cfg.get("tie_word_embeddings", False)),
                           minor=2 if cfg.get("tie_word_embeddings") else 1, **sizes, **_rope_settings(path, cfg))
    except (KeyError, TypeError, ValueError) as e:
        raise _error(path, f"config.json sizes: {e}") from None


_READERS: dict[str, Callable[[str, dict], Any]] = {"gpt2": _gpt2_config, "llama": _llama_config}


def read_model_header(path: str | os.PathLike) -> tuple[GPTConfig | LlamaConfig, int]:
    """(config, 0) of an HF checkpoint directory, the weights unread (0: no llm.c format version)."""
    path = os.fspath(path)
    cfg = _read_json(os.path.join(path, "config.json"))
    kind = cfg.get("model_type")
    if kind not in _READERS:
        raise _error(path, f"config.json model_type {kind!r}: llmc-jax reads 'gpt2' and 'llama' checkpoints")
    return _READERS[kind](path, cfg), 0


# ---------------------------------------------------------------- tensors

class _Tensors:
    """The checkpoint's tensors by name across its safetensors files (single or sharded)."""

    def __init__(self, path: str):
        self.path = path
        index = os.path.join(path, INDEX)
        if os.path.exists(index):
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise _error(index, "has no weight_map object")
            files = {f: SafetensorsFile(os.path.join(path, f)) for f in sorted(set(weight_map.values()))}
            self.where = {name: files[f] for name, f in weight_map.items()}
        elif os.path.exists(os.path.join(path, SINGLE)):
            single = SafetensorsFile(os.path.join(path, SINGLE))
            self.where = {name: single for name in single.keys()}
        else:
            raise _error(path, f"no {SINGLE} or {INDEX} (llmc-jax reads safetensors weights only; save the "
                               "model with save_pretrained(..., safe_serialization=True))")

    def has(self, name: str) -> bool:
        return name in self.where

    def get(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in self.where:
            raise _error(self.path, f"checkpoint has no tensor {name!r}")
        a = self.where[name].get(name)
        if a.shape != shape:
            raise _error(self.path, f"tensor {name!r} has shape {a.shape}, expected {shape} from config.json")
        return a


def _stack(t: _Tensors, L: int, fmt: str, shape: tuple[int, ...], f: Callable = lambda a: a) -> np.ndarray:
    return np.stack([f(t.get(fmt.format(i), shape)) for i in range(L)])


def _gpt2_params(t: _Tensors, c: GPTConfig) -> dict[str, np.ndarray]:
    p = "transformer." if t.has("transformer.wte.weight") else ""
    C, L = c.C, c.L
    layer = lambda name, shape, f=lambda a: a: _stack(t, L, p + "h.{}." + name, shape, f)
    wte = np.zeros((c.Vp, C), np.float32)
    wte[:c.V] = t.get(p + "wte.weight", (c.V, C))
    if t.has("lm_head.weight") and not np.array_equal(t.get("lm_head.weight", (c.V, C)), wte[:c.V]):
        raise _error(t.path, "lm_head.weight differs from the token embedding (GPT-2's head is tied)")
    return {"wte": wte, "wpe": t.get(p + "wpe.weight", (c.maxT, C)),
            "ln1w": layer("ln_1.weight", (C,)), "ln1b": layer("ln_1.bias", (C,)),
            "qkvw": layer("attn.c_attn.weight", (C, 3 * C), np.transpose), "qkvb": layer("attn.c_attn.bias", (3 * C,)),
            "attprojw": layer("attn.c_proj.weight", (C, C), np.transpose), "attprojb": layer("attn.c_proj.bias", (C,)),
            "ln2w": layer("ln_2.weight", (C,)), "ln2b": layer("ln_2.bias", (C,)),
            "fcw": layer("mlp.c_fc.weight", (C, 4 * C), np.transpose), "fcb": layer("mlp.c_fc.bias", (4 * C,)),
            "fcprojw": layer("mlp.c_proj.weight", (4 * C, C), np.transpose), "fcprojb": layer("mlp.c_proj.bias", (C,)),
            "lnfw": t.get(p + "ln_f.weight", (C,)), "lnfb": t.get(p + "ln_f.bias", (C,))}


def _to_interleaved(w: np.ndarray, heads: int) -> np.ndarray:
    """HF's rotate-half row order of q_proj/k_proj -> Meta's interleaved pairs, per head."""
    rows, C = w.shape
    return w.reshape(heads, 2, rows // heads // 2, C).transpose(0, 2, 1, 3).reshape(rows, C)


def _to_half(w: np.ndarray, heads: int) -> np.ndarray:
    """Meta's interleaved row order -> HF's rotate-half (the conversion script's permute)."""
    rows, C = w.shape
    return w.reshape(heads, rows // heads // 2, 2, C).transpose(0, 2, 1, 3).reshape(rows, C)


def _llama_layer(t: _Tensors, c: LlamaConfig, i: int) -> dict[str, np.ndarray]:
    C, HS, H = c.C, c.HS, c.hidden
    g = lambda name, shape: t.get(f"model.layers.{i}.{name}.weight", shape)
    q = _to_interleaved(g("self_attn.q_proj", (c.NH * HS, C)), c.NH)
    k = _to_interleaved(g("self_attn.k_proj", (c.NKV * HS, C)), c.NKV)
    return {"ln1w": g("input_layernorm", (C,)), "qkvw": np.concatenate([q, k, g("self_attn.v_proj", (c.NKV * HS, C))]),
            "attprojw": g("self_attn.o_proj", (C, c.NH * HS)), "ln2w": g("post_attention_layernorm", (C,)),
            "fcw": np.concatenate([g("mlp.up_proj", (H, C)), g("mlp.gate_proj", (H, C))]),
            "fcprojw": g("mlp.down_proj", (C, H))}


def _llama_params(t: _Tensors, c: LlamaConfig) -> dict[str, np.ndarray]:
    layers = [_llama_layer(t, c, i) for i in range(c.L)]
    params = {name: np.stack([lp[name] for lp in layers]) for name in layers[0]}
    params["wte"] = t.get("model.embed_tokens.weight", (c.V, c.C))
    params["lnfw"] = t.get("model.norm.weight", (c.C,))
    if not c.tied:
        params["lm_head"] = t.get("lm_head.weight", (c.V, c.C))
    return params


def read_model(path: str | os.PathLike) -> tuple[GPTConfig | LlamaConfig, dict[str, np.ndarray]]:
    """(config, float32 params keyed as the family's param_shapes()) of an HF checkpoint directory."""
    path = os.fspath(path)
    config, _ = read_model_header(path)
    tensors = _Tensors(path)
    params = (_gpt2_params if isinstance(config, GPTConfig) else _llama_params)(tensors, config)
    return config, params


# ---------------------------------------------------------------- writing

def _gpt2_out(c: GPTConfig, p: Mapping[str, np.ndarray]) -> tuple[dict, dict[str, np.ndarray]]:
    cfg = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "activation_function": "gelu_new",
           "n_embd": c.C, "n_head": c.NH, "n_layer": c.L, "n_positions": c.maxT, "n_inner": None,
           "vocab_size": c.V, "layer_norm_epsilon": 1e-5, "tie_word_embeddings": True,
           "bos_token_id": GPT2_EOT if c.V > GPT2_EOT else None, "eos_token_id": GPT2_EOT if c.V > GPT2_EOT else None}
    out = {"transformer.wte.weight": p["wte"][:c.V], "transformer.wpe.weight": p["wpe"]}
    names = (("ln_1.weight", "ln1w", False), ("ln_1.bias", "ln1b", False), ("attn.c_attn.weight", "qkvw", True),
             ("attn.c_attn.bias", "qkvb", False), ("attn.c_proj.weight", "attprojw", True),
             ("attn.c_proj.bias", "attprojb", False), ("ln_2.weight", "ln2w", False), ("ln_2.bias", "ln2b", False),
             ("mlp.c_fc.weight", "fcw", True), ("mlp.c_fc.bias", "fcb", False),
             ("mlp.c_proj.weight", "fcprojw", True), ("mlp.c_proj.bias", "fcprojb", False))
    for i in range(c.L):
        for hf, ours, conv1d in names:
            out[f"transformer.h.{i}.{hf}"] = p[ours][i].T if conv1d else p[ours][i]
    out["transformer.ln_f.weight"], out["transformer.ln_f.bias"] = p["lnfw"], p["lnfb"]
    return cfg, out


def _hf_max_positions(c: LlamaConfig) -> int:
    """HF's max_position_embeddings: maxT, except that transformers requires it above llama3 RoPE's
    original_max_position_embeddings (a model shorter than 8192 gets factor x original, the length
    the scaling is for; the frequencies do not depend on it). llmc_max_seq_len keeps maxT."""
    if c.use_scaled_rope and c.maxT <= c.rope_original_maxT:
        return int(c.rope_factor * c.rope_original_maxT)
    return c.maxT


def _llama_out(c: LlamaConfig, p: Mapping[str, np.ndarray]) -> tuple[dict, dict[str, np.ndarray]]:
    llama3_vocab = c.V == 128256
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
           "hidden_size": c.C, "intermediate_size": c.hidden, "num_hidden_layers": c.L,
           "num_attention_heads": c.NH, "num_key_value_heads": c.NKV, "head_dim": c.HS, "vocab_size": c.V,
           "max_position_embeddings": _hf_max_positions(c), "rms_norm_eps": c.norm_eps, "rope_theta": c.rope_theta,
           "rope_scaling": {"rope_type": "llama3", "factor": c.rope_factor, "low_freq_factor": c.rope_low_freq_factor,
                            "high_freq_factor": c.rope_high_freq_factor,
                            "original_max_position_embeddings": c.rope_original_maxT} if c.use_scaled_rope else None,
           "tie_word_embeddings": c.tied, "attention_bias": False, "mlp_bias": False,
           "bos_token_id": LLAMA3_BOS if llama3_vocab else None, "eos_token_id": LLAMA3_EOS if llama3_vocab else None,
           "llmc_max_seq_len": c.maxT, "llmc_multiple_of": c.multiple_of, "llmc_ffn_dim_multiplier": c.ffn_dim_multiplier}
    out = {"model.embed_tokens.weight": p["wte"]}
    q_rows, kv_rows, H = c.NH * c.HS, c.NKV * c.HS, c.hidden
    for i in range(c.L):
        qkv, fc, pre = p["qkvw"][i], p["fcw"][i], f"model.layers.{i}."
        out.update({pre + "input_layernorm.weight": p["ln1w"][i],
                    pre + "self_attn.q_proj.weight": _to_half(qkv[:q_rows], c.NH),
                    pre + "self_attn.k_proj.weight": _to_half(qkv[q_rows:q_rows + kv_rows], c.NKV),
                    pre + "self_attn.v_proj.weight": qkv[q_rows + kv_rows:],
                    pre + "self_attn.o_proj.weight": p["attprojw"][i],
                    pre + "post_attention_layernorm.weight": p["ln2w"][i],
                    pre + "mlp.up_proj.weight": fc[:H], pre + "mlp.gate_proj.weight": fc[H:],
                    pre + "mlp.down_proj.weight": p["fcprojw"][i]})
    out["model.norm.weight"] = p["lnfw"]
    if not c.tied:
        out["lm_head.weight"] = p["lm_head"]
    return cfg, out


MAX_SHARD_BYTES = 5 * 10**9      # save_pretrained's long-standing "5GB": Llama 3.1 8B ships 4 such shards
_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors$")


def _shards(tensors: Mapping[str, np.ndarray], max_bytes: int, bytes_per_value: int) -> list[list[str]]:
    """Tensor names in order, cut into consecutive groups of at most max_bytes (a larger tensor alone)."""
    groups, size = [[]], 0
    for name, t in tensors.items():
        n = t.size * bytes_per_value
        if groups[-1] and size + n > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += n
    return groups


def write_model(path: str | os.PathLike, config: GPTConfig | LlamaConfig, params: Mapping[str, Any],
                dtype: str = "float32", max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """Write an HF checkpoint directory that from_pretrained loads: config.json and model.safetensors,
    or, past max_shard_bytes, model-0000k-of-0000N.safetensors with model.safetensors.index.json (as
    save_pretrained shards). Weights of an earlier export in the other layout are removed, so the
    directory holds one checkpoint. float32 round-trips through read_model bit for bit."""
    path = os.fspath(path)
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"HF checkpoint dtype must be float32 or bfloat16, got {dtype!r}")
    params = {k: np.asarray(v, np.float32) for k, v in params.items()}
    cfg, tensors = (_gpt2_out if isinstance(config, GPTConfig) else _llama_out)(config, params)
    cfg["torch_dtype"] = dtype
    os.makedirs(path, exist_ok=True)
    st_dtype, width = ("F32", 4) if dtype == "float32" else ("BF16", 2)
    groups = _shards(tensors, max_shard_bytes, width)
    files = [SINGLE] if len(groups) == 1 else [f"model-{k:05d}-of-{len(groups):05d}.safetensors"
                                               for k in range(1, len(groups) + 1)]
    for f, names in zip(files, groups):             # each file atomically; the old checkpoint stays
        write_file(os.path.join(path, f), {n: tensors[n] for n in names}, st_dtype, {"format": "pt"})
    if len(files) > 1:
        index = {"metadata": {"total_size": sum(t.size * width for t in tensors.values())},
                 "weight_map": {n: f for f, names in zip(files, groups) for n in names}}
        _write_json(os.path.join(path, INDEX), index)
    keep = set(files) | ({INDEX} if len(files) > 1 else set())
    for f in os.listdir(path):      # the other layout's weights (or more shards) would be read instead
        if (f in (SINGLE, INDEX) or _SHARD.match(f)) and f not in keep:
            os.remove(os.path.join(path, f))
    _write_json(os.path.join(path, "config.json"), cfg)


def _write_json(path: str, obj: dict) -> None:
    atomic_write(path, [np.frombuffer((json.dumps(obj, indent=2) + "\n").encode(), np.uint8)])
