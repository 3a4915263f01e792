"""Megatron <-> Hugging Face parameter mapping, declared as data per architecture.

Every rule maps one *canonical* megatron tensor (full TP1/PP1/EP1 shape, global layer and expert
indices, see ``r1mega.models.sharding``) to one or more HF tensors, and back. Names are templates
with ``{layer}`` and ``{expert}`` placeholders; the transform is one of a few kinds:

* :class:`Direct`  - same tensor under another name (norms, projections, router, expert bias);
* :class:`Vocab`   - embedding / output rows: padded megatron vocabulary trimmed on export, padded
  with zeros on import;
* :class:`QKV`     - megatron's fused ``linear_qkv`` (per query group ``[q heads..., k, v]``) <->
  ``q_proj``, ``k_proj``, ``v_proj`` (weights, and biases for Qwen2);
* :class:`Gated`   - SwiGLU ``linear_fc1`` ``[gate; up]`` <-> two HF tensors;
* :class:`InterleavedGateUp` / :class:`Transposed` - one expert of HF's packed ``[in, out]`` expert
  tensors (gpt-oss), gate and up interleaved.

HF architectures that store all experts of a layer in one tensor (gpt-oss: ``mlp.experts.gate_up_proj``
``[E, ...]``) name each expert's slice with an ``{expert}`` template and declare a :class:`PackedExperts`:
export stacks the slices (``packed_tensors``), import reads slice ``e`` of the packed tensor.

This module is the rule engine and the rule lists families share; each family
(``r1mega/models/<family>/rules.py``) declares its :class:`Architecture` from them, and
``r1mega.models.registry`` finds it by preset or HF ``model_type``. HF names are the on-disk
(``save_pretrained`` / hub) names: experts stored one per tensor, which ``transformers`` 5 fuses on
load and vLLM reads as is.

Multi-token prediction (DeepSeek-V3): megatron's ``mtp.layers.{m}`` is HF's ``model.layers.{N+m}``
(N decoder layers). Its transformer layer maps with the decoder rules of layer N+m; ``mtp_own`` maps
``enorm``, ``hnorm``, ``eh_proj`` and the shared head's norm. HF also stores the embedding and the
output head again in each MTP layer (``embed_tokens``, ``shared_head.head``); megatron shares the
model's, so export writes copies and import requires them equal to the model's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch


class BridgeError(ValueError):
    """Unsupported architecture, unmapped tensor or mismatched shape (message says which)."""


@dataclass(frozen=True)
class Dims:
    """What transforms need to know about the model (from the megatron / r1mega config)."""

    vocab_size: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    hidden_size: int
    num_layers: int = 0  # decoder layers: the HF index of MTP layer m is num_layers + m
    mtp_num_layers: int = 0
    num_experts: int = 0  # routed experts per MoE layer (the packed HF expert tensors' first dim)


@dataclass(frozen=True)
class Rule:
    megatron: str
    hf: tuple[str, ...]

    def to_hf(self, tensor: torch.Tensor, dims: Dims) -> list[torch.Tensor]:
        raise NotImplementedError

    def to_megatron(self, tensors: list[torch.Tensor], dims: Dims, full_shape: tuple[int, ...]) -> torch.Tensor:
        raise NotImplementedError


@dataclass(frozen=True)
class Direct(Rule):
    def to_hf(self, tensor, dims):
        return [tensor]

    def to_megatron(self, tensors, dims, full_shape):
        return tensors[0]


@dataclass(frozen=True)
class Vocab(Rule):
    def to_hf(self, tensor, dims):
        return [tensor[: dims.vocab_size]]

    def to_megatron(self, tensors, dims, full_shape):
        (hf,) = tensors
        if hf.shape[0] == full_shape[0]:
            return hf
        out = hf.new_zeros(full_shape)
        out[: hf.shape[0]] = hf
        return out


@dataclass(frozen=True)
class QKV(Rule):
    """Rows are interleaved per query group; trailing dims (weight columns, none for a bias) ride along."""

    def to_hf(self, tensor, dims):
        groups, per = dims.num_query_groups, dims.num_attention_heads // dims.num_query_groups
        d, rest = dims.head_dim, tuple(tensor.shape[1:])
        w = tensor.reshape(groups, (per + 2) * d, *rest)
        q, k, v = w.split([per * d, d, d], dim=1)
        return [t.reshape(-1, *rest) for t in (q, k, v)]

    def to_megatron(self, tensors, dims, full_shape):
        q, k, v = tensors
        groups, per = dims.num_query_groups, dims.num_attention_heads // dims.num_query_groups
        d, rest = dims.head_dim, tuple(q.shape[1:])
        fused = torch.cat([q.reshape(groups, per * d, *rest), k.reshape(groups, d, *rest),
                           v.reshape(groups, d, *rest)], dim=1)
        return fused.reshape(-1, *rest)


@dataclass(frozen=True)
class Gated(Rule):
    def to_hf(self, tensor, dims):
        return list(tensor.chunk(2, dim=0))

    def to_megatron(self, tensors, dims, full_shape):
        return torch.cat(tensors, dim=0)


@dataclass(frozen=True)
class InterleavedGateUp(Rule):
    """``linear_fc1`` ``[gate; up]`` (weight ``[2I, H]`` or bias ``[2I]``) <-> one expert of HF's
    ``gate_up_proj`` ``[H, 2I]`` / ``gate_up_proj_bias`` ``[2I]``: gate and up alternate (gate = ``[..., 0::2]``),
    the weight stored ``[in, out]``."""

    def to_hf(self, tensor, dims):
        gate, up = tensor.chunk(2, dim=0)
        rows = torch.stack((gate, up), dim=1).reshape(tensor.shape)
        return [rows.t() if rows.dim() == 2 else rows]

    def to_megatron(self, tensors, dims, full_shape):
        (hf,) = tensors
        rows = hf.t() if hf.dim() == 2 else hf
        return torch.cat((rows[0::2], rows[1::2]), dim=0)


@dataclass(frozen=True)
class Transposed(Rule):
    """A linear weight that HF stores ``[in, out]`` (gpt-oss's ``down_proj``)."""

    def to_hf(self, tensor, dims):
        return [tensor.t()]

    def to_megatron(self, tensors, dims, full_shape):
        return tensors[0].t()


@dataclass(frozen=True)
class PackedExperts:
    """HF stores every expert of a layer in one tensor ``packed`` (template with ``{layer}``), expert ``e``
    at index ``e`` of its first dimension; the rules name expert ``e``'s slice ``per_expert`` (``{layer}``
    and ``{expert}``)."""

    per_expert: str
    packed: str


def packed_tensors(arch: "Architecture", named: list[tuple[str, torch.Tensor]], num_experts: int
                   ) -> list[tuple[str, torch.Tensor]]:
    """``named`` with every packed architecture's per-expert slices stacked into their HF tensors (at the
    place of the first slice). All ``num_experts`` slices of a packed tensor must be in ``named``."""
    if not arch.packed:
        return named
    out: list = []
    slots: dict[str, dict[int, torch.Tensor]] = {}
    for name, t in named:
        hit = arch.unpack(name)
        if hit is None:
            out.append((name, t))
            continue
        packed, expert = hit
        if packed not in slots:
            slots[packed] = {}
            out.append((packed, None))
        slots[packed][expert] = t
    result = []
    for name, t in out:
        if t is None:
            experts = slots[name]
            if sorted(experts) != list(range(num_experts)):
                raise BridgeError(f"{name}: got experts {sorted(experts)} of {num_experts} to pack")
            t = torch.stack([experts[e] for e in range(num_experts)])
        result.append((name, t))
    return result


# ----------------------------------------------------------------------------- registry


_MTP = re.compile(r"^mtp\.layers\.(\d+)\.(.+)$")
_TRANSFORMER_LAYER = "transformer_layer."


class SharedCopy(Rule):
    """A megatron tensor that HF also stores in every MTP layer: equal copies, checked on import."""

    def __init__(self, inner: Rule, copies: tuple[str, ...]):
        object.__setattr__(self, "megatron", inner.megatron)
        object.__setattr__(self, "hf", inner.hf + copies)
        object.__setattr__(self, "inner", inner)

    def to_hf(self, tensor, dims):
        outs = self.inner.to_hf(tensor, dims)
        return outs + [outs[0]] * (len(self.hf) - len(self.inner.hf))

    def to_megatron(self, tensors, dims, full_shape):
        main, copies = tensors[: len(self.inner.hf)], tensors[len(self.inner.hf):]
        for name, copy in zip(self.hf[len(self.inner.hf):], copies):
            if not torch.equal(copy, main[0]):
                raise BridgeError(f"{name} differs from {self.hf[0]}: the r1mega model's MTP layers share the "
                                  "model's embedding and output head (as megatron does), so a checkpoint whose "
                                  "MTP copies differ cannot be represented")
        return self.inner.to_megatron(main, dims, full_shape)


@dataclass
class Architecture:
    """One family's mapping: r1mega preset family <-> its HF ``model_type``."""

    preset: str
    model_type: str
    hf_class: str  # transformers class name written to config.json "architectures"
    rules: list[Rule]
    # MTP layers (DeepSeek-V3): megatron tensor under mtp.layers.{m}. -> HF name under model.layers.{N+m}.
    mtp_own: dict[str, str] = field(default_factory=dict)
    # megatron tensor -> its HF copy under model.layers.{N+m}. in each MTP layer
    mtp_copies: dict[str, str] = field(default_factory=dict)
    # checkpoints may leave those copies out (GLM-4.6; GLM-4.5 has them): import reads the ones present,
    # export writes them all
    mtp_copies_optional: bool = False
    # HF tensors that hold all experts of a layer (gpt-oss); the rules name one expert's slice
    packed: tuple[PackedExperts, ...] = ()
    _compiled: list = field(default_factory=list, repr=False)
    _unpack: list = field(default_factory=list, repr=False)

    def unpack(self, hf_name: str) -> tuple[str, int] | None:
        """(packed HF tensor, expert index) when ``hf_name`` is one expert's slice of a packed tensor."""
        if self.packed and not self._unpack:
            self._unpack = [(p, _template_regex(p.per_expert)) for p in self.packed]
        for p, regex in self._unpack:
            m = regex.fullmatch(hf_name)
            if m:
                return p.packed.format(layer=m["layer"]), int(m["expert"])
        return None

    def stored(self, hf_name: str) -> tuple[str, int | None]:
        """The HF tensor on disk that holds ``hf_name``, and the expert index when it packs all experts."""
        hit = self.unpack(hf_name)
        return hit if hit is not None else (hf_name, None)

    def packed_layer(self, megatron_name: str, dims: Dims | None = None) -> int | None:
        """The decoder layer whose packed expert tensors ``megatron_name`` is part of (None: not packed):
        export keeps all such tensors of a layer in one bucket."""
        if not self.packed:
            return None
        rule, fields_ = self.rule_for(megatron_name, dims)
        hit = next((self.unpack(h.format(**fields_)) for h in rule.hf), None)
        return int(fields_["layer"]) if hit is not None else None

    def compiled(self):
        if not self._compiled:
            self._compiled = [(rule, _template_regex(rule.megatron)) for rule in self.rules]
        return self._compiled

    def _match(self, megatron_name: str) -> tuple[Rule, dict[str, str]]:
        for rule, regex in self.compiled():
            m = regex.fullmatch(megatron_name)
            if m:
                return rule, m.groupdict()
        raise BridgeError(f"{self.preset}: no HF mapping for megatron tensor {megatron_name!r}")

    def rule_for(self, megatron_name: str, dims: Dims | None = None) -> tuple[Rule, dict[str, str]]:
        """The rule and its placeholder values; MTP names need ``dims`` (the decoder's layer count)."""
        m = _MTP.match(megatron_name)
        if m:
            if not self.mtp_own:
                raise BridgeError(f"{self.preset}: no HF mapping for megatron tensor {megatron_name!r} "
                                  "(this family maps no multi-token prediction layers)")
            if dims is None or not dims.mtp_num_layers:
                raise BridgeError(f"{megatron_name}: an MTP tensor, but the model has no MTP layers")
            layer, rest = dims.num_layers + int(m[1]), m[2]
            if rest in self.mtp_own:
                return Direct(megatron_name, (f"model.layers.{layer}.{self.mtp_own[rest]}",)), {}
            if rest.startswith(_TRANSFORMER_LAYER):
                return self._match(f"decoder.layers.{layer}.{rest[len(_TRANSFORMER_LAYER):]}")
            raise BridgeError(f"{self.preset}: no HF mapping for MTP tensor {megatron_name!r}")
        rule, fields_ = self._match(megatron_name)
        if dims is not None and dims.mtp_num_layers and megatron_name in self.mtp_copies:
            copies = tuple(f"model.layers.{dims.num_layers + i}.{self.mtp_copies[megatron_name]}"
                           for i in range(dims.mtp_num_layers))
            rule = SharedCopy(rule, copies)
        return rule, fields_

    def is_mtp_copy(self, hf_name: str, dims: Dims) -> bool:
        """``hf_name`` is an MTP layer's copy of the embedding or output head."""
        layer, _, rest = hf_name.removeprefix("model.layers.").partition(".")
        return (hf_name.startswith("model.layers.") and layer.isdigit() and int(layer) >= dims.num_layers
                and rest in self.mtp_copies.values())

    def hf_names(self, megatron_name: str, dims: Dims | None = None) -> list[str]:
        rule, fields_ = self.rule_for(megatron_name, dims)
        return [h.format(**fields_) for h in rule.hf]

    def to_hf(self, megatron_name: str, tensor: torch.Tensor, dims: Dims) -> list[tuple[str, torch.Tensor]]:
        rule, fields_ = self.rule_for(megatron_name, dims)
        outs = rule.to_hf(tensor, dims)
        return [(h.format(**fields_), t) for h, t in zip(rule.hf, outs)]

    def to_megatron(self, megatron_name: str, tensors: list[torch.Tensor], dims: Dims,
                    full_shape: tuple[int, ...]) -> torch.Tensor:
        rule, _ = self.rule_for(megatron_name, dims)
        out = rule.to_megatron(tensors, dims, tuple(full_shape))
        if tuple(out.shape) != tuple(full_shape):
            raise BridgeError(f"{megatron_name}: HF tensors {self.hf_names(megatron_name, dims)} give shape "
                              f"{tuple(out.shape)}, the megatron model expects {tuple(full_shape)}")
        return out


def _template_regex(template: str) -> re.Pattern:
    parts = re.split(r"(\{layer\}|\{expert\})", template)
    out = "".join(f"(?P<{p[1:-1]}>\\d+)" if p in ("{layer}", "{expert}") else re.escape(p) for p in parts)
    return re.compile(out)


# ----------------------------------------------------------------------------- rules families share

L = "decoder.layers.{layer}."
H = "model.layers.{layer}."

COMMON = [  # embedding, output head, final norm, the layer norms, attention output
    Vocab("embedding.word_embeddings.weight", ("model.embed_tokens.weight",)),
    Vocab("output_layer.weight", ("lm_head.weight",)),
    Direct("decoder.final_layernorm.weight", ("model.norm.weight",)),
    Direct(L + "input_layernorm.weight", (H + "input_layernorm.weight",)),
    Direct(L + "pre_mlp_layernorm.weight", (H + "post_attention_layernorm.weight",)),
    Direct(L + "self_attention.linear_proj.weight", (H + "self_attn.o_proj.weight",)),
]
GQA = [
    QKV(L + "self_attention.linear_qkv.weight",
        (H + "self_attn.q_proj.weight", H + "self_attn.k_proj.weight", H + "self_attn.v_proj.weight")),
]
QKV_BIAS = [
    QKV(L + "self_attention.linear_qkv.bias",
        (H + "self_attn.q_proj.bias", H + "self_attn.k_proj.bias", H + "self_attn.v_proj.bias")),
]
QK_NORM = [
    Direct(L + "self_attention.q_layernorm.weight", (H + "self_attn.q_norm.weight",)),
    Direct(L + "self_attention.k_layernorm.weight", (H + "self_attn.k_norm.weight",)),
]
EXPERT = L + "mlp.experts.local_experts.{expert}."


def swiglu(megatron_prefix: str, hf_prefix: str, gate: str = "gate_proj", up: str = "up_proj",
           down: str = "down_proj") -> list[Rule]:
    return [Gated(megatron_prefix + "linear_fc1.weight", (f"{hf_prefix}{gate}.weight", f"{hf_prefix}{up}.weight")),
            Direct(megatron_prefix + "linear_fc2.weight", (f"{hf_prefix}{down}.weight",))]
