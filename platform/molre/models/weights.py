"""Backbone checkpoints as published, read from a local path or s3:// and converted to the preset net's keys.

Formats, recognised by their tensor names (``detect_format``):
  native       the preset net's own timm / MONAI keys (optionally under ``net.``; ``proj.`` = the projection)
  dinov3-meta  Meta's DINOv3 release (``storage_tokens``, ``blocks.N.ls1.gamma``, ...): timm's own converter
  dinov3-hf    Hugging Face ``DINOv3ViTModel`` (``embeddings.register_tokens``, ``layer.N.attention.q_proj``)
  siglip-hf    Hugging Face ``SiglipVisionModel``, or the vision tower inside a whole MedGemma / Gemma 3
               checkpoint (``vision_tower.vision_model.encoder.layers.N...``): only the tower is read
A URI names one file (``.safetensors`` or a torch file), a sharded checkpoint's ``*.safetensors.index.json``,
or a folder in Hugging Face's layout (``model.safetensors`` or ``model.safetensors.index.json``). Safetensors
are read by byte ranges: MedGemma 4B's 8.6 GB checkpoint costs its 0.8 GB vision tower (fetched concurrently
on S3). Nothing here touches a model hub.
"""

from __future__ import annotations

import io
import json
import logging
import math
import posixpath
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from molre.errors import WeightsError

log = logging.getLogger(__name__)

_HEAD_KEYS = ("head.", "fc_norm.", "head_drop.", "class_layers.")  # classifier heads a headless net drops
_MAX_HEADER = 100 << 20  # a safetensors header past 100 MB is a damaged file, not a checkpoint
_HF_FILE, _HF_INDEX = "model.safetensors", "model.safetensors.index.json"
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip


# ---- reading -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    """One tensor of a safetensors file: where its bytes lie (absolute offsets) and what they hold."""

    uri: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int


class Checkpoint:
    """A checkpoint's tensor names, and its tensors read by name (safetensors: only those tensors' bytes)."""

    def __init__(self, uri: str):
        self.uri = uri
        self._entries: dict[str, _Entry] = {}
        self._loaded: dict[str, torch.Tensor] = {}
        files = _safetensors_files(uri)
        if files is None:
            self._loaded = _read_torch(uri)
        for file in files or ():
            self._entries.update(_safetensors_entries(file))

    @property
    def names(self) -> list[str]:
        return sorted(self._loaded or self._entries)

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        if self._loaded:
            return {n: self._loaded[n] for n in names}
        by_file: dict[str, list[str]] = {}
        for name in names:
            by_file.setdefault(self._entries[name].uri, []).append(name)
        return {
            name: t for file, group in by_file.items() for name, t in self._read_file(file, group).items()
        }

    def _read_file(self, uri: str, names: list[str]) -> dict[str, torch.Tensor]:
        entries = [self._entries[n] for n in names]
        blobs = _read_ranges(uri, [(e.start, e.end) for e in entries])
        return {n: _tensor(uri, n, e, blob) for n, e, blob in zip(names, entries, blobs, strict=True)}


def _tensor(uri: str, name: str, entry: _Entry, blob: bytes) -> torch.Tensor:
    size = math.prod(entry.shape) * torch.empty((), dtype=entry.dtype).element_size()
    if len(blob) != size:  # a truncated download reads short at the end of the file
        raise WeightsError(
            f"weights file {uri}: tensor {name} has {len(blob)} bytes, its shape {entry.shape} needs {size} "
            "(a truncated file?)"
        )
    if not blob:
        return torch.empty(entry.shape, dtype=entry.dtype)
    return torch.frombuffer(bytearray(blob), dtype=entry.dtype).reshape(entry.shape)


def _safetensors_files(uri: str) -> list[str] | None:
    """The safetensors files a URI names (a file, an index or a Hugging Face folder); None: a torch file."""
    from molre.data import storage

    if uri.endswith(".index.json"):
        return _index_files(uri)
    if uri.endswith(".safetensors"):
        return [uri]
    if not storage.is_dir(uri):
        return None  # a torch file (or nothing: reading it says so)
    if storage.exists(storage.join(uri, _HF_INDEX)):
        return _index_files(storage.join(uri, _HF_INDEX))
    if storage.exists(storage.join(uri, _HF_FILE)):
        return [storage.join(uri, _HF_FILE)]
    raise WeightsError(f"weights folder {uri} holds neither {_HF_FILE} nor {_HF_INDEX}")


def _index_files(uri: str) -> list[str]:
    """The shard files a sharded checkpoint's index maps its tensors to, next to the index."""
    from molre.data import storage

    try:
        weight_map = json.loads(_read_bytes(uri))["weight_map"]
        files = sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise WeightsError(
            f"weights index {uri} is not a safetensors index ({type(err).__name__}: {err})"
        ) from None
    folder = uri.rsplit("/", 1)[0] if "/" in uri else "."
    return [storage.join(folder, posixpath.normpath(f)) for f in files]


def _safetensors_entries(uri: str) -> dict[str, _Entry]:
    """Parse a safetensors header: 8 bytes little-endian N, then N bytes of JSON, then the tensors' bytes."""
    head = _read_ranges(uri, [(0, 8)])[0]
    size = int.from_bytes(head, "little") if len(head) == 8 else -1
    if not 0 < size <= _MAX_HEADER:
        raise WeightsError(f"weights file {uri} is not valid safetensors: no header")
    try:
        header = json.loads(_read_ranges(uri, [(8, 8 + size)])[0])
        entries = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if info["dtype"] not in _DTYPES:
                raise ValueError(f"tensor {name} has dtype {info['dtype']}, which molre does not read")
            begin, end = info["data_offsets"]
            entries[name] = _Entry(
                uri, _DTYPES[info["dtype"]], tuple(info["shape"]), 8 + size + begin, 8 + size + end
            )
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise WeightsError(f"weights file {uri} is not valid safetensors: {err}") from None
    return entries


def _read_torch(uri: str) -> dict[str, torch.Tensor]:
    """A torch file's flat name -> tensor dict (``weights_only``: never unpickles code), unwrapped."""
    try:
        state = torch.load(io.BytesIO(_read_bytes(uri)), map_location="cpu", weights_only=True)
    except WeightsError:
        raise
    except Exception as err:
        raise WeightsError(
            f"weights file {uri} is neither safetensors nor a torch state dict: {err}"
        ) from None
    for key in ("state_dict", "model", "module"):  # common checkpoint wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if (
        not isinstance(state, dict)
        or not state
        or not all(isinstance(v, torch.Tensor) for v in state.values())
    ):
        raise WeightsError(f"weights file {uri} does not hold a flat name -> tensor state dict")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _read_bytes(uri: str) -> bytes:
    return _weights_io(uri, lambda storage: storage.read_bytes(uri))


def _read_ranges(uri: str, ranges: list[tuple[int, int]]) -> list[bytes]:
    return _weights_io(uri, lambda storage: storage.read_ranges(uri, ranges))


def _weights_io(uri: str, read):
    """``read(molre.data.storage)``, a missing or unreadable file as a WeightsError naming it."""
    from molre.data import storage

    try:
        return read(storage)
    except FileNotFoundError:
        raise WeightsError(f"weights file {uri} does not exist") from None
    except OSError as err:
        raise WeightsError(f"weights file {uri} cannot be read: {err}") from None


def read_state_dict(uri: str) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint (one file, an index or a Hugging Face folder; local or s3://)."""
    checkpoint = Checkpoint(uri)
    return checkpoint.read(checkpoint.names)


# ---- formats -----------------------------------------------------------------------------------------------

_DINOV3_HF_ROOT = "embeddings.patch_embeddings.weight"
_SIGLIP_HF_ROOT = "embeddings.patch_embedding.weight"


def detect_format(names: list[str]) -> str:
    """Which published layout a checkpoint's tensor names are in (module docstring)."""
    if "storage_tokens" in names:
        return "dinov3-meta"
    if any(n.endswith(_DINOV3_HF_ROOT) for n in names) and any(".attention.q_proj." in n for n in names):
        return "dinov3-hf"
    if any(n.endswith(_SIGLIP_HF_ROOT) for n in names) and any(".self_attn.q_proj." in n for n in names):
        return "siglip-hf"
    return "native"


def _read_model(
    checkpoint: Checkpoint, root_tensor: str, skip: tuple[str, ...] = ()
) -> dict[str, torch.Tensor]:
    """The tensors of the model that holds ``root_tensor``, named from that model's root: a Gemma 3
    checkpoint's vision tower (under ``vision_tower.vision_model.``) without its language model; ``skip``:
    name prefixes left unread."""
    root = min((n[: -len(root_tensor)] for n in checkpoint.names if n.endswith(root_tensor)), key=len)
    wanted = [n for n in checkpoint.names if n.startswith(root) and not n.removeprefix(root).startswith(skip)]
    return {n.removeprefix(root): t for n, t in checkpoint.read(wanted).items()}


def _rename(state: dict[str, torch.Tensor], rules: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """Apply the first matching ``(regex, replacement)`` rule to each name; a name no rule matches is kept
    (and reported as unexpected by ``check_state_dict``)."""
    out = {}
    for name, tensor in state.items():
        for pattern, repl in rules:
            new, hits = re.subn(pattern, repl, name)
            if hits:
                name = new
                break
        out[name] = tensor
    return out


def _fuse_qkv(state: dict[str, torch.Tensor], pattern: str) -> dict[str, torch.Tensor]:
    """Concatenate separate q / k / v projections (``pattern``: a group for the block, ``{}`` for the letter)
    into timm's fused ``blocks.N.attn.qkv``: [3*d, d] weights, [3*d] biases (a missing k bias is 0)."""
    out = dict(state)
    fused: dict[str, dict[str, torch.Tensor]] = {}
    for name in list(state):
        m = re.fullmatch(pattern.format("(q|k|v)") + r"\.(weight|bias)", name)
        if m:
            block, letter, kind = m.group(1), m.group(2), m.group(3)
            fused.setdefault(f"blocks.{block}.attn.qkv.{kind}", {})[letter] = out.pop(name)
    for name, parts in fused.items():
        if name.endswith(".bias") and "k" not in parts and "q" in parts:  # DINOv3: q and v biases only
            parts["k"] = torch.zeros_like(parts["q"])
        if set(parts) != {"q", "k", "v"}:
            raise WeightsError(f"{name}: the checkpoint has only the {sorted(parts)} parts of q / k / v")
        out[name] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def _qkv_bias_for(net: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm's DINOv3 ViTs keep q and v biases apart (``q_bias`` / ``v_bias``) or have none (the distilled
    B/L releases' biases are all zero). Zero biases a bias-free net drops; nonzero ones it cannot take are
    kept, so that ``check_state_dict`` reports them rather than the model silently changing."""
    own = net.state_dict()
    out = dict(state)
    for name in [n for n in state if n.endswith("attn.qkv.bias")]:
        q, k, v = out.pop(name).chunk(3)
        block = name.removesuffix("qkv.bias")
        if f"{block}q_bias" in own:
            out[f"{block}q_bias"], out[f"{block}v_bias"] = q, v
        elif name in own or torch.count_nonzero(torch.cat([q, v])):
            out[name] = torch.cat([q, k, v])
    return out


def _from_dinov3_hf(checkpoint: Checkpoint, net: nn.Module) -> dict[str, torch.Tensor]:
    state = _read_model(checkpoint, _DINOV3_HF_ROOT, skip=("embeddings.mask_token",))  # pretraining only
    layer = r"^(?:model\.)?layer\.(\d+)\."
    state = _fuse_qkv(state, layer[1:] + r"attention\.{}_proj")
    return _qkv_bias_for(net, _rename(state, [
        (r"^embeddings\.cls_token$", "cls_token"),
        (r"^embeddings\.register_tokens$", "reg_token"),
        (r"^embeddings\.patch_embeddings\.", "patch_embed.proj."),
        (layer + r"attention\.o_proj\.", r"blocks.\1.attn.proj."),
        (layer + r"layer_scale1\.lambda1$", r"blocks.\1.gamma_1"),
        (layer + r"layer_scale2\.lambda1$", r"blocks.\1.gamma_2"),
        (layer + r"mlp\.up_proj\.", r"blocks.\1.mlp.fc1."),
        (layer + r"mlp\.down_proj\.", r"blocks.\1.mlp.fc2."),
        (layer + r"(norm[12])\.", r"blocks.\1.\2."),
    ]))  # fmt: skip


def _from_dinov3_meta(checkpoint: Checkpoint, net: nn.Module) -> dict[str, torch.Tensor]:
    from timm.models.eva import checkpoint_filter_fn

    state = {n: t for n, t in checkpoint.read(checkpoint.names).items() if not n.endswith(".bias_mask")}
    state = _qkv_bias_for(net, state)  # first: timm's converter drops biases a net has no place for, silently
    biases = {n: t for n, t in state.items() if n.endswith(("attn.qkv.bias", "attn.q_bias", "attn.v_bias"))}
    rest = {n: t for n, t in state.items() if n not in biases}
    return {**checkpoint_filter_fn(rest, net), **biases}


def _from_siglip_hf(checkpoint: Checkpoint, net: nn.Module) -> dict[str, torch.Tensor]:
    state = _read_model(checkpoint, _SIGLIP_HF_ROOT, skip=("head.",))  # SigLIP's MAP head: Gemma 3 has none
    layer = r"^encoder\.layers\.(\d+)\."
    state = _fuse_qkv(state, layer[1:] + r"self_attn\.{}_proj")
    if "embeddings.position_embedding.weight" in state:  # [T, d] -> timm's [1, T, d]
        state["pos_embed"] = state.pop("embeddings.position_embedding.weight").unsqueeze(0)
    return _rename(state, [
        (r"^embeddings\.patch_embedding\.", "patch_embed.proj."),
        (r"^post_layernorm\.", "norm."),
        (layer + r"layer_norm1\.", r"blocks.\1.norm1."),
        (layer + r"layer_norm2\.", r"blocks.\1.norm2."),
        (layer + r"self_attn\.out_proj\.", r"blocks.\1.attn.proj."),
        (layer + r"mlp\.(fc[12])\.", r"blocks.\1.mlp.\2."),
    ])  # fmt: skip


_CONVERTERS: dict[str, Callable[[Checkpoint, nn.Module], dict[str, torch.Tensor]]] = {
    "dinov3-meta": _from_dinov3_meta,
    "dinov3-hf": _from_dinov3_hf,
    "siglip-hf": _from_siglip_hf,
}


def _fit_pos_embed(net: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A ViT run at another ``image_size`` than its checkpoint: resample the absolute position embedding to
    the net's patch grid (bicubic, timm's helper; MedGemma at 448^2 = 32x32 patches from its 64x64)."""
    own = net.state_dict().get("pos_embed")
    theirs = state.get("pos_embed")
    if own is None or theirs is None or own.shape == theirs.shape or not hasattr(net, "patch_embed"):
        return state
    from timm.layers import resample_abs_pos_embed

    prefix = 0 if getattr(net, "no_embed_class", False) else getattr(net, "num_prefix_tokens", 0)
    resized = resample_abs_pos_embed(
        theirs.float(), list(net.patch_embed.grid_size), num_prefix_tokens=prefix
    )
    return {**state, "pos_embed": resized.to(theirs.dtype)}


# ---- loading -----------------------------------------------------------------------------------------------


def check_state_dict(
    model: nn.Module, state: dict[str, torch.Tensor], source: str, ignore=_HEAD_KEYS
) -> None:
    """Raise a ``WeightsError`` listing missing, unexpected and mis-shaped keys, if any."""
    own = model.state_dict()
    missing = sorted(k for k in own if k not in state)
    unexpected = sorted(k for k in state if k not in own and not k.startswith(ignore))
    misshaped = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    )
    if missing or unexpected or misshaped:
        parts = [f"weights {source} do not fit {type(model).__name__}:"]
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
            if keys:
                shown = ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")
                parts.append(f"  {label} keys: {shown}")
        raise WeightsError("\n".join(parts))


def load_backbone_weights(backbone, uri: str) -> str:
    """Load a preset's real weights into a freshly built ``Backbone`` (before LoRA wraps its linears); returns
    the checkpoint's format."""
    checkpoint = Checkpoint(uri)
    fmt = detect_format(checkpoint.names)
    proj_state: dict[str, torch.Tensor] = {}
    if fmt == "native":
        state = checkpoint.read(checkpoint.names)
        proj_state = {k.removeprefix("proj."): v for k, v in state.items() if k.startswith("proj.")}
        net_state = {k.removeprefix("net."): v for k, v in state.items() if not k.startswith("proj.")}
        source = uri
    else:
        net_state = _CONVERTERS[fmt](checkpoint, backbone.net)
        source = f"{uri} (read as {fmt})"
    net_state = _fit_pos_embed(backbone.net, net_state)
    check_state_dict(backbone.net, net_state, source)
    backbone.net.load_state_dict(_in_own_dtypes(backbone.net, net_state), assign=True)
    if backbone.proj is not None:
        check_state_dict(backbone.proj, proj_state, f"{source} (projection)")
        backbone.proj.load_state_dict(_in_own_dtypes(backbone.proj, proj_state), assign=True)
    log.info("backbone %s: weights %s read as %s", backbone.preset.name, uri, fmt)
    return fmt


def _in_own_dtypes(module: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors that ``module`` holds, cast to the module's own dtypes: ``assign=True`` would
    otherwise keep a bf16 export's dtype (MedGemma's towers ship in bf16) under fp32 adapters and head."""
    own = module.state_dict()
    return {k: v.to(own[k].dtype) for k, v in state.items() if k in own}


# ---- `molre weights` ---------------------------------------------------------------------------------------


def add_arguments(parser) -> None:
    parser.add_argument("preset", help="backbone preset, e.g. dinov3-base or medgemma")
    parser.add_argument(
        "uri", help="a checkpoint file, a *.safetensors.index.json or a folder; local or s3://"
    )
    parser.add_argument("--image-size", type=int, default=None, help="slice / volume side (default: native)")


def run(args) -> int:
    """Load a checkpoint into a preset's backbone on the CPU, as a run would, and report what was read: the
    check to make before a cluster sweep spends GPU hours on a checkpoint that does not fit."""
    import time

    from molre.models.backbones import create_backbone

    start = time.perf_counter()
    backbone = create_backbone(args.preset, args.image_size).eval()
    fmt = load_backbone_weights(backbone, args.uri)
    params = sum(p.numel() for p in backbone.parameters())
    x = torch.rand(2, *backbone.expected_input())  # two random window stacks in 0..1
    with torch.no_grad():
        embedding = backbone(x)
    if not torch.isfinite(embedding).all():
        raise WeightsError(f"weights {args.uri}: the {args.preset} backbone's embedding is not finite")
    print(f"{args.uri}: read as {fmt}, {params:,} parameters loaded into {args.preset} "
          f"({time.perf_counter() - start:.1f} s)")  # fmt: skip
    print(f"embedding of 2 random inputs {tuple(x.shape[1:])}: width {embedding.shape[1]}, "
          f"std {embedding.std().item():.4g}, finite; input scaled: {backbone.normalized}")  # fmt: skip
    return 0
