"""Sharded tensors on ``torch.distributed.checkpoint`` (DCP): every rank writes the pieces
it owns, every rank reads only the pieces it needs.

A stored tensor has one *global* shape, the same at every TP size, and each rank's
piece is a box (offsets, sizes) in it; DCP's metadata lists the boxes and, on load,
its resharding (``create_read_items_for_chunk_list``) turns any set of saved boxes into
the reads a new layout needs. What a box is for our parallel layers:

- a TP-sharded parameter (``tp_dim``) is one box per TP rank, at ``rank x local size``
  along ``tp_dim``;
- a fused parameter (``tp_stride`` s > 1, e.g. ``[Q|K|V]``) is *viewed* with ``tp_dim``
  split into (s, size / s): each rank's ``[Q_r|K_r|V_r]`` is then one box of the global
  (s, n x size / s) tensor, whose plain reshape is the full ``[Q|K|V]``;
- the vocab dim (``vocab_dim``) is stored at the tokenizer's size, unpadded: the padding
  (which depends on TP) is cut off on save and zero-filled on load;
- a copy held by several ranks (DP replicas, or a replicated parameter on every TP
  rank) is written once: the ranks split its flattened elements into equal ranges,
  each a few boxes (:func:`flat_boxes`), so the write and its memory are shared;
- ZeRO's partitions and the distributed optimizer's slices are flat ranges of the same
  kind: each DP rank writes its own.

Nothing is pickled into the data files but tensors; DCP's ``.metadata`` *is* a pickle,
read here by :class:`SafeReader` through an unpickler that only builds DCP's metadata
classes and a few torch/builtin types (anything else: :class:`UnsafeCheckpoint`).
"""

from __future__ import annotations

import dataclasses
import io
import math
import pickle
import warnings
from collections import OrderedDict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.default_planner import create_default_global_save_plan
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.planner import (
    LoadPlan,
    LoadPlanner,
    SavePlan,
    SavePlanner,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

Box = tuple[tuple[int, ...], tuple[int, ...]]  # (offsets, sizes)


class UnsafeCheckpoint(pickle.UnpicklingError):
    """A ``.metadata`` file that asks for anything but DCP's metadata classes."""


# ---------------------------------------------------------------------------- geometry


def flat_boxes(shape: tuple[int, ...], start: int, stop: int) -> list[tuple[Box, int]]:
    """Elements ``[start, stop)`` of a row-major tensor of ``shape`` as boxes, each
    contiguous in memory: ``((offsets, sizes), flat index of its first element)``."""
    if start >= stop:
        return []
    if not shape:
        return [(((), ()), 0)]
    if len(shape) == 1:
        return [(((start,), (stop - start,)), start)]
    inner = math.prod(shape[1:])
    rest = tuple(shape[1:])

    def within(row: int, a: int, b: int) -> list[tuple[Box, int]]:
        return [(((row, *off), (1, *size)), row * inner + f)
                for (off, size), f in flat_boxes(rest, a, b)]

    first, last = start // inner, (stop - 1) // inner
    if first == last:
        return within(first, start - first * inner, stop - first * inner)
    out = []
    row = first
    if start % inner:  # the partial first row
        out += within(first, start % inner, inner)
        row = first + 1
    end_row = stop // inner  # rows [row, end_row) are whole
    if end_row > row:
        out.append((((row, *(0,) * len(rest)), (end_row - row, *rest)), row * inner))
    if stop % inner:  # the partial last row
        out += within(end_row, 0, stop % inner)
    return out


def clip(box: Box, extent: tuple[int, ...]) -> Box | None:
    """``box`` cut to ``[0, extent)`` in every dim (None when nothing is left)."""
    off, size = box
    cut = tuple(max(0, min(o + s, e) - o) for o, s, e in zip(off, size, extent, strict=True))
    return None if any(s == 0 for s in cut) else (off, cut)


def narrow(t: torch.Tensor, offsets, sizes) -> torch.Tensor:
    for d, (o, s) in enumerate(zip(offsets, sizes, strict=True)):
        t = t.narrow(d, o, s)
    return t


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where a rank's (TP-local) tensor sits in the stored global tensor.

    ``view`` is the local tensor's shape as stored (fused dims split), ``offsets`` the
    position of that view in ``global_shape``, ``extent`` how much of the view exists in
    the global tensor (less than ``view`` along a padded vocab dim), and ``full_shape``
    the global tensor's plain shape (``global_shape`` with fused dims merged back).
    """
    view: tuple[int, ...]
    global_shape: tuple[int, ...]
    offsets: tuple[int, ...]
    extent: tuple[int, ...]
    full_shape: tuple[int, ...]


def placement(p: torch.Tensor, shape: tuple[int, ...], tp_rank: int, tp_size: int,
              vocab_size: int | None) -> Placement:
    """The placement of a tensor of ``shape`` sharded like parameter ``p``.

    Args:
        vocab_size: the unpadded vocab size (the stored size of ``p.vocab_dim``).
    """
    shape = tuple(shape)
    dim, stride = getattr(p, "tp_dim", None), getattr(p, "tp_stride", 1) or 1
    vdim = getattr(p, "vocab_dim", None)
    if not shape or (dim is None and vdim is None):
        return Placement(shape, shape, (0,) * len(shape), shape, shape)
    if dim is None:
        dim, tp_rank, tp_size = vdim, 0, 1  # a replicated vocab dim: padding only
    if stride > 1:
        if vdim is not None:
            raise ValueError("a fused (tp_stride > 1) vocab dim is not supported")
        block = shape[dim] // stride
        view = shape[:dim] + (stride, block) + shape[dim + 1:]
        glob = shape[:dim] + (stride, block * tp_size) + shape[dim + 1:]
        offsets = [0] * len(view)
        offsets[dim + 1] = tp_rank * block
        full = shape[:dim] + (shape[dim] * tp_size,) + shape[dim + 1:]
        return Placement(view, glob, tuple(offsets), view, full)
    glob, offsets, extent = list(shape), [0] * len(shape), list(shape)
    glob[dim] = shape[dim] * tp_size
    offsets[dim] = tp_rank * shape[dim]
    if vdim is not None and vocab_size is not None:
        glob[vdim] = vocab_size
        extent[vdim] = max(0, min(shape[vdim], vocab_size - offsets[vdim]))
    return Placement(shape, tuple(glob), tuple(offsets), tuple(extent), tuple(glob))


@dataclasses.dataclass
class Piece:
    """One box of a stored tensor: written from, or read into, ``tensor``."""
    fqn: str
    offsets: tuple[int, ...]  # in the global tensor
    global_shape: tuple[int, ...]
    tensor: torch.Tensor  # shaped like the box


def pieces(fqn: str, local: torch.Tensor, where: Placement, start: int = 0,
           stop: int | None = None, flat: torch.Tensor | None = None) -> list[Piece]:
    """The boxes of elements ``[start, stop)`` of ``local`` (viewed as ``where.view``),
    cut to what the global tensor holds.

    Args:
        flat: where those elements live instead of ``local``, flattened, from index 0 for
            element ``start`` (a ZeRO partition's slice); then ``local`` only gives shapes.
    """
    n = math.prod(where.view)
    stop = n if stop is None else stop
    out = []
    for box, first in flat_boxes(where.view, start, stop):
        cut = clip(box, where.extent)
        if cut is None:
            continue
        if flat is None:
            data = narrow(local.view(where.view), *cut)
        else:
            data = narrow(flat.narrow(0, first - start, math.prod(box[1])).view(box[1]),
                          (0,) * len(cut[0]), cut[1])
        offsets = tuple(o + b for o, b in zip(where.offsets, cut[0], strict=True))
        out.append(Piece(fqn, offsets, where.global_shape, data))
    return out


def share(n: int, index: int, count: int) -> tuple[int, int]:
    """The ``index``-th of ``count`` near-equal ranges of ``n`` elements."""
    return n * index // count, n * (index + 1) // count


# ---------------------------------------------------------------------------- planners


class _SavePlanner(SavePlanner):
    """Writes exactly the given pieces; the coordinator checks that they tile every
    tensor once (no gap, no overlap, nothing outside)."""

    def __init__(self, items: list[Piece]):
        self.items = {(it.fqn, it.offsets): it for it in items}

    def set_up_planner(self, state_dict, storage_meta=None, is_coordinator=False) -> None:
        self.is_coordinator = is_coordinator

    def create_local_plan(self) -> SavePlan:
        requests = []
        for it in self.items.values():
            offsets = torch.Size(it.offsets)
            requests.append(WriteItem(
                index=dcp_metadata.MetadataIndex(it.fqn, offsets),
                type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(
                    chunk=dcp_metadata.ChunkStorageMetadata(offsets, it.tensor.size()),
                    properties=dcp_metadata.TensorProperties.create_from_tensor(it.tensor),
                    size=torch.Size(it.global_shape))))
        self.plan = SavePlan(requests)
        return self.plan

    def create_global_plan(self, all_plans):
        plans, md = create_default_global_save_plan(all_plans)
        for fqn, tmd in md.state_dict_metadata.items():
            covered = sum(math.prod(c.sizes) for c in tmd.chunks)
            if covered != math.prod(tmd.size):
                raise RuntimeError(f"{fqn}: the saved pieces cover {covered} of "
                                   f"{math.prod(tmd.size)} elements")
        return plans, md

    def finish_plan(self, new_plan: SavePlan) -> SavePlan:
        self.plan = new_plan
        return new_plan

    def resolve_data(self, write_item: WriteItem):
        it = self.items[(write_item.index.fqn, tuple(write_item.index.offset))]
        return it.tensor.detach()


class _LoadPlanner(LoadPlanner):
    """Reads the given pieces (each a box of a stored tensor) and nothing else."""

    def __init__(self, targets: list[Piece]):
        self.by_name: dict[str, list[Piece]] = {}
        for t in targets:
            self.by_name.setdefault(t.fqn, []).append(t)

    def set_up_planner(self, state_dict, metadata=None, is_coordinator=False) -> None:
        self.metadata = metadata

    def create_local_plan(self) -> LoadPlan:
        stored = self.metadata.state_dict_metadata
        requests = []
        for fqn, targets in self.by_name.items():
            md = stored.get(fqn)
            if not isinstance(md, dcp_metadata.TensorStorageMetadata):
                raise KeyError(f"{fqn} is not in the checkpoint")
            for t in targets:
                if tuple(md.size) != tuple(t.global_shape):
                    raise ValueError(f"{fqn}: saved shape {tuple(md.size)} does not fit "
                                     f"{tuple(t.global_shape)}")
            chunks = [dcp_metadata.ChunkStorageMetadata(torch.Size(t.offsets), t.tensor.size())
                      for t in targets]  # a read item's dest_index.index is its position
            requests += create_read_items_for_chunk_list(fqn, md, chunks)
        return LoadPlan(requests)

    def create_global_plan(self, global_plan):
        return global_plan

    def finish_plan(self, new_plan):
        return new_plan

    def load_bytes(self, read_item, value) -> None:
        raise UnsafeCheckpoint(f"{read_item.dest_index.fqn}: a pickled object, not a tensor")

    def resolve_tensor(self, read_item):
        idx = read_item.dest_index
        return narrow(self.by_name[idx.fqn][idx.index].tensor, read_item.dest_offsets,
                      read_item.lengths)

    def commit_tensor(self, read_item, tensor) -> None:
        pass


# ---------------------------------------------------------------------------- safe metadata

_ALLOWED = {
    ("torch.distributed.checkpoint.metadata", n) for n in (
        "Metadata", "TensorStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "BytesStorageMetadata", "StorageMeta", "MetadataIndex", "_MEM_FORMAT_ENCODING")
} | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
     ("torch", "Size"), ("collections", "OrderedDict"),
     ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),  # StorageMeta.checkpoint_id
     ("torch.serialization", "_get_layout")}  # a lookup of torch.strided... by name
_DTYPES = {str(d).removeprefix("torch.") for d in (
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
    torch.int16, torch.int8, torch.uint8, torch.bool, torch.complex64, torch.complex128)}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED or (module == "torch" and name in _DTYPES):
            return getattr(__import__(module, fromlist=[name]), name)
        raise UnsafeCheckpoint(f"refused to load {module}.{name}")


def read_dcp_metadata(path: Path) -> dcp_metadata.Metadata:
    """DCP's ``.metadata`` through the allow-list unpickler."""
    with open(path, "rb") as f:
        md = _MetadataUnpickler(io.BufferedReader(f)).load()
    if not isinstance(md, dcp_metadata.Metadata) or not all(
            isinstance(v, _StorageInfo) for v in (md.storage_data or {}).values()):
        raise UnsafeCheckpoint("not a DCP metadata object")
    for info in md.storage_data.values():  # data files only in the checkpoint's own folder
        if Path(info.relative_path).name != info.relative_path or \
                not info.relative_path.endswith(".distcp"):
            raise UnsafeCheckpoint(f"data file {info.relative_path!r}")
    return md


class SafeReader(FileSystemReader):
    """DCP's file reader, with the metadata read by :func:`read_dcp_metadata` (the data
    files' tensors are ``torch.load``-ed by DCP with ``weights_only=True``)."""

    def read_metadata(self, *args, **kwargs) -> dcp_metadata.Metadata:
        md = read_dcp_metadata(Path(self.path) / ".metadata")
        if getattr(md, "storage_meta", None) is None:
            md.storage_meta = dcp_metadata.StorageMeta()
        md.storage_meta.load_id = self.load_id
        return md


# ---------------------------------------------------------------------------- save / load


def write_pieces(folder: Path, items: list[Piece], group=None) -> None:
    """Collective over ``group`` (all ranks; none without torch.distributed): write every
    rank's pieces into ``folder`` (one ``__RANK_0.distcp`` per rank and ``.metadata``)."""
    writer = FileSystemWriter(folder, single_file_per_rank=True, sync_files=True,
                              thread_count=1)
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process"
        warnings.simplefilter("ignore", UserWarning)
        dcp.save({}, storage_writer=writer, planner=_SavePlanner(items), process_group=group,
                 no_dist=not dist.is_initialized())


def read_pieces(folder: Path, targets: list[Piece]) -> None:
    """Fill every target from ``folder`` (no communication: each rank reads its boxes)."""
    if targets:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            dcp.load({}, storage_reader=SafeReader(folder), planner=_LoadPlanner(targets),
                     no_dist=True)


def stored_tensors(folder: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Every stored tensor's global shape and dtype."""
    md = read_dcp_metadata(Path(folder) / ".metadata")
    return {k: (tuple(v.size), v.properties.dtype) for k, v in md.state_dict_metadata.items()
            if isinstance(v, dcp_metadata.TensorStorageMetadata)}


def read_full(folder: Path, prefix: str = "") -> OrderedDict[str, torch.Tensor]:
    """Every stored tensor whose name starts with ``prefix``, whole, at its global shape
    (keys without the prefix)."""
    out = OrderedDict()
    targets = []
    for fqn, (shape, dtype) in sorted(stored_tensors(folder).items()):
        if fqn.startswith(prefix):
            t = torch.empty(shape, dtype=dtype)
            out[fqn[len(prefix):]] = t
            targets.append(Piece(fqn, (0,) * len(shape), shape, t))
    read_pieces(folder, targets)
    return out
