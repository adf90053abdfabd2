"""The typed model architecture: shapes, the layer pattern, parameter and FLOP counts, and each
layer's mask terms.

`ModelConfig.from_config(config.model)` turns the validated `model` section of a run's config
(ctxjax/config.py holds the defaults and the checks) into a frozen, hashable dataclass; the
model, the FLOP count and the converters read it. Like nanoGPT's GPTConfig, it keeps the
arithmetic about the model with the model.
"""
from __future__ import annotations

import dataclasses
from typing import Any

WINDOW_MASKS = ("chunk", "sliding")  # how the SkyLadder window masks the global layers


def _frozen(value):
    """Lists (e.g. longrope factors) as tuples, so the config hashes."""
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    return value


@dataclasses.dataclass(frozen=True)
class LayerMask:
    """The mask terms of one layer besides causal, documents and sinks (which every layer has).
    `window` (sliding) and `chunk` (block-wise) are None when the layer has no such term, a
    Python int when fixed (local layers), or the step's traced SkyLadder window."""
    window: Any = None
    chunk: Any = None

    def as_fields(self) -> dict[str, Any]:
        """MaskSpec / pair-count keyword arguments."""
        return dict(window=self.window, chunk=self.chunk)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int  # resolved: never 0
    mlp_dim: int
    norm_eps: float
    tie_embeddings: bool
    qkv_bias: bool
    init_std: float
    max_position_embeddings: int
    rope: tuple  # sorted (key, value) items of the HF-style rope_parameters dict
    layer_pattern: tuple
    local_window: int
    document_mask: bool
    sinks: int
    param_dtype: str
    dtype: str

    @classmethod
    def from_config(cls, section) -> "ModelConfig":
        """From the `model` section of a run config (a ConfigDict or a dict)."""
        values = section.to_dict() if hasattr(section, "to_dict") else dict(section)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise KeyError(f"config.model has no key(s) {unknown}; see ctxjax/config.py for the model knobs.")
        rope = values["rope"]
        rope = rope.to_dict() if hasattr(rope, "to_dict") else dict(rope)
        values.update(
            head_dim=int(values["head_dim"] or values["d_model"] // values["n_heads"]),
            rope=tuple(sorted((k, _frozen(v)) for k, v in rope.items())),
            layer_pattern=tuple(values["layer_pattern"]))
        return cls(**values)

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    @property
    def rope_parameters(self) -> dict:
        """The rope dict in HF transformers 5.x `rope_parameters` form."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.rope}

    # ------------------------------------------------------------------ the layer pattern

    def pattern_windows(self) -> tuple[int | None, ...]:
        """The fixed sliding window of each entry of `layer_pattern` (None for 'global')."""
        windows = []
        for kind in self.layer_pattern:
            if kind == "global":
                windows.append(None)
            elif kind == "local":
                windows.append(int(self.local_window))
            elif isinstance(kind, str) and kind.startswith("local:") and kind[6:].isdigit() and int(kind[6:]) > 0:
                windows.append(int(kind[6:]))
            else:
                raise ValueError(f"model.layer_pattern entry {kind!r} is not 'global', 'local' or "
                                 f"'local:<window>' (a positive int).")
        return tuple(windows)

    def layer_windows(self) -> tuple[int | None, ...]:
        """The fixed sliding window of every layer (None for global layers)."""
        pattern = self.pattern_windows()
        return tuple(pattern[i % len(pattern)] for i in range(self.n_layers))

    def layer_masks(self, window=None, window_mask: str = "chunk") -> tuple[LayerMask, ...]:
        """Each pattern entry's mask terms for this step. `window` is the SkyLadder window of the
        global layers (None when no window applies: SkyLadder off or the climb finished), as a
        'chunk' (block-wise) or 'sliding' term. Local layers keep their own window; a global
        layer has no window term unless the schedule gives one. The model and the FLOP count
        both read this, so they cannot disagree."""
        if window_mask not in WINDOW_MASKS:
            raise ValueError(f"window_mask={window_mask!r}; choose one of {WINDOW_MASKS}.")
        masks = []
        for local in self.pattern_windows():
            if local is not None:
                masks.append(LayerMask(window=local))
            elif window is None:
                masks.append(LayerMask())
            else:
                masks.append(LayerMask(**{"chunk" if window_mask == "chunk" else "window": window}))
        return tuple(masks)

    # ------------------------------------------------------------------ counts

    def param_count(self, *, embedding: bool = True) -> int:
        d, hd, f, L = self.d_model, self.head_dim, self.mlp_dim, self.n_layers
        per_layer = d * hd * (2 * self.n_heads + 2 * self.n_kv_heads) + 3 * d * f + 2 * d
        per_layer += hd * (self.n_heads + 2 * self.n_kv_heads) if self.qkv_bias else 0
        total = L * per_layer + d
        head = 0 if self.tie_embeddings else d * self.vocab_size
        return total + head + (self.vocab_size * d if embedding else 0)

    def matmul_params(self) -> int:
        """Parameters that enter a matmul per token: every weight matrix, the (tied or not)
        output head included, the embedding lookup, norms and biases not."""
        biases = self.head_dim * (self.n_heads + 2 * self.n_kv_heads) if self.qkv_bias else 0
        count = self.param_count(embedding=False) - self.n_layers * (2 * self.d_model + biases) - self.d_model
        return count + (self.vocab_size * self.d_model if self.tie_embeddings else 0)

    def matmul_flops_per_token(self) -> float:
        """Training FLOPs per token of the weight matmuls: 6 x matmul params (2 forward, 4
        backward). Attention's score/value products are counted separately, per allowed pair."""
        return 6.0 * self.matmul_params()

    def attention_flops_per_pair(self) -> float:
        """Training FLOPs per allowed (query, key) pair and layer: QK^T and PV are 2 x 2 x D per
        head forward, twice that backward (no remat recompute)."""
        return 3 * 4.0 * self.n_heads * self.head_dim


def layer_masks_of(model: ModelConfig, window, window_mask: str) -> tuple[LayerMask, ...]:
    """Every layer's mask terms, in layer order (the pattern repeated over n_layers)."""
    pattern = model.layer_masks(window, window_mask)
    return tuple(pattern[i % len(pattern)] for i in range(model.n_layers))

