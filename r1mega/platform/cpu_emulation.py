"""Let megatron-core run on a CPU-only machine (gloo), for tests, the demo and development.

megatron-core assumes CUDA: it calls ``torch.cuda.*`` unconditionally, allocates with
``device=torch.cuda.current_device()``, asserts ``torch.cuda.FloatTensor`` and uses collectives that
gloo lacks. :func:`install` patches exactly those places, once per process, *before* megatron is
imported, and only when CUDA is unavailable. Everything version-specific to megatron-core lives here
and in :mod:`r1mega.platform.megatron_compat`, so a newer megatron on a GPU cluster never sees it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import sys
import types

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as distributed_c10d

from r1mega.platform import call_counts

log = logging.getLogger(__name__)

_INSTALLED = False
_CPU = torch.device("cpu")


def is_needed() -> bool:
    return not torch.cuda.is_available()


def is_installed() -> bool:
    return _INSTALLED


def _to_cpu_device(device):
    """Map any CUDA device spec (``'cuda'``, ``'cuda:0'``, ``0``, ``torch.device('cuda')``) to CPU."""
    if device is None:
        return None
    if isinstance(device, int) and not isinstance(device, bool):
        return _CPU
    if isinstance(device, str) and device.startswith("cuda"):
        return _CPU
    if isinstance(device, torch.device) and device.type == "cuda":
        return _CPU
    return device


def _cpu_placed(fn):
    """``fn`` with a CUDA ``device`` argument mapped to the CPU and ``pin_memory`` off (megatron stages its CP
    rope indices in pinned memory, which needs CUDA)."""

    @functools.wraps(fn)
    def placed(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        return fn(*args, **kwargs)

    return placed


def _placing_names() -> tuple[list[str], list[str]]:
    """The public torch functions and ``Tensor.new_*`` methods that take a ``device`` or ``pin_memory``
    argument: from the ATen schemas (a newer torch's new factories are found too), plus the Python-level
    constructors that have none."""
    names = {schema.name.split("::", 1)[1] for schema in torch._C._jit_get_all_schemas()
             if any(a.name in ("device", "pin_memory") for a in schema.arguments)}
    names = {n for n in names if not n.startswith("_")} | {"tensor", "as_tensor", "asarray", "new_tensor"}
    functions = sorted(n for n in names if n != "Generator" and callable(getattr(torch, n, None)))
    methods = sorted(n for n in names if n.startswith("new_") and hasattr(torch.Tensor, n))
    return functions, methods


def _patch_placement() -> None:
    """Tensors megatron places on CUDA land on the CPU: every torch function and ``Tensor`` method that
    places a tensor maps a CUDA device to the CPU, ``.cuda()`` is the tensor itself, and ``.type()`` names
    the "CUDA" type megatron asserts (``torch.cuda.FloatTensor``).

    Why not a ``TorchFunctionMode``: a mode calls into Python for every torch call of every op (about
    2.5 us each, ~6k calls in a demo GRPO step, 5-8% of a tiny model's learner step), while only these
    functions can place a tensor; they are patched where megatron looks them up, on ``torch`` and
    ``torch.Tensor``, before megatron is imported.
    """
    from torch.utils._device import _device_constructors

    # `with torch.device(...)` (transformers' meta-device init, vLLM's model loader) puts its device into the
    # factory calls it finds in this lazily built table: built after the wrapping, it would hold the wrappers,
    # never see the original calls they make, and build those models on the CPU with no error
    _device_constructors()
    functions, methods = _placing_names()
    for name in functions:
        setattr(torch, name, _cpu_placed(getattr(torch, name)))
    for name in methods:
        setattr(torch.Tensor, name, _cpu_placed(getattr(torch.Tensor, name)))
    orig_to, orig_type = torch.Tensor.to, torch.Tensor.type

    @functools.wraps(orig_to)
    def to(self, *args, **kwargs):
        if args and isinstance(args[0], (str, int, torch.device)) and not isinstance(args[0], bool):
            args = (_to_cpu_device(args[0]),) + args[1:]
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        return orig_to(self, *args, **kwargs)

    @functools.wraps(orig_type)
    def type_(self, *args, **kwargs):
        if args or kwargs:
            return orig_type(self, *args, **kwargs)
        # megatron asserts e.g. `param.type() == 'torch.cuda.FloatTensor'`: every emulated tensor is "CUDA"
        name = orig_type(self)
        return name if name.startswith("torch.cuda.") else name.replace("torch.", "torch.cuda.", 1)

    torch.Tensor.to = to
    torch.Tensor.type = type_
    torch.Tensor.cuda = lambda self, *args, **kwargs: self


class _NullStream:
    """Stand-in for ``torch.cuda.Stream``/``Event``: CPU work is already ordered."""

    def __init__(self, *args, **kwargs):
        self.device = _CPU

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def wait_stream(self, *a, **k):
        pass

    def wait_event(self, *a, **k):
        pass

    def record_event(self, *a, **k):
        return _NullStream()

    def record(self, *a, **k):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def wait(self, *a, **k):
        pass

    def elapsed_time(self, other):
        return 0.0


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    cpu_generator = torch.default_generator

    cuda.current_device = lambda: "cpu"
    cuda.device_count = lambda: 1
    cuda.set_device = lambda *a, **k: None
    cuda.synchronize = lambda *a, **k: None
    cuda.empty_cache = lambda: None
    cuda.Stream = _NullStream
    cuda.Event = _NullStream
    cuda.ExternalStream = _NullStream
    cuda.current_stream = lambda *a, **k: _NullStream()
    cuda.default_stream = lambda *a, **k: _NullStream()
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    cuda.set_stream = lambda *a, **k: None
    cuda.memory_allocated = lambda *a, **k: 0
    cuda.memory_reserved = lambda *a, **k: 0
    cuda.max_memory_allocated = lambda *a, **k: 0
    cuda.max_memory_reserved = lambda *a, **k: 0
    cuda.reset_peak_memory_stats = lambda *a, **k: None
    cuda.memory_stats = lambda *a, **k: {}
    cuda.get_rng_state = lambda *a, **k: cpu_generator.get_state()
    cuda.set_rng_state = lambda state, *a, **k: cpu_generator.set_state(state)
    cuda.manual_seed = lambda seed: None  # torch.manual_seed already seeds the CPU generator
    cuda.manual_seed_all = lambda seed: None
    cuda.random.get_rng_state = cuda.get_rng_state
    cuda.random.set_rng_state = cuda.set_rng_state
    cuda.get_device_capability = lambda *a, **k: (0, 0)
    nvtx = types.SimpleNamespace(
        range_push=lambda *a, **k: None,
        range_pop=lambda *a, **k: None,
        range=lambda *a, **k: contextlib.nullcontext(),
        mark=lambda *a, **k: None,
    )
    cuda.nvtx = nvtx


def _patch_collectives() -> None:
    """gloo lacks uneven all_to_all_single and the *_tensor collectives megatron uses.

    Over a group of one process the gathers and reduce-scatters are copies, made here in the calling
    thread. gloo would make them in its own worker thread, whose first large copy starts a second
    OpenMP thread pool in the process. libgomp then counts more OpenMP threads than cores and cuts every
    pool's spin-wait to a few iterations, so each parallel op of the learner has to wake its worker
    thread through the kernel: a one-process learner step ran about a quarter slower on 2 threads.
    """
    orig_all_to_all_single = dist.all_to_all_single
    orig_all_gather_into_tensor = dist.all_gather_into_tensor
    orig_reduce_scatter_tensor = dist.reduce_scatter_tensor

    def _is_gloo(group) -> bool:
        return dist.get_backend(group) == "gloo"

    def _alone(group) -> bool:
        return dist.get_world_size(group) == 1

    def _done(async_op):
        if not async_op:
            return None
        return _CompletedWork()

    @functools.wraps(orig_all_to_all_single)
    def all_to_all_single(output, input, output_split_sizes=None, input_split_sizes=None,
                          group=None, async_op=False):
        if not _is_gloo(group):
            return orig_all_to_all_single(output, input, output_split_sizes, input_split_sizes,
                                          group=group, async_op=async_op)
        world = dist.get_world_size(group)
        in_sizes = _split_sizes(input_split_sizes, input.shape[0], world)
        out_sizes = _split_sizes(output_split_sizes, output.shape[0], world)
        inputs = [t.contiguous() for t in torch.split(input, in_sizes)]
        outputs = [torch.empty((n,) + tuple(output.shape[1:]), dtype=output.dtype) for n in out_sizes]
        _all_to_all_via_p2p(outputs, inputs, group)
        if outputs:
            torch.cat(outputs, out=output) if output.numel() else None
        return _done(async_op)

    @functools.wraps(orig_all_gather_into_tensor)
    def all_gather_into_tensor(output, input, group=None, async_op=False):
        if not _is_gloo(group):
            return orig_all_gather_into_tensor(output, input, group=group, async_op=async_op)
        if _alone(group):
            output.copy_(input.reshape(output.shape))
            return _done(async_op)
        world = dist.get_world_size(group)
        chunks = list(output.chunk(world)) if output.dim() else [output]
        if output.shape[0] != input.shape[0] * world:
            # Megatron's buffers are flat: view them as `world` equal chunks.
            chunks = list(output.view(world, -1).unbind(0))
            parts = [torch.empty_like(c) for c in chunks]
            dist.all_gather(parts, input.reshape(-1).contiguous(), group=group)
            for c, p in zip(chunks, parts):
                c.copy_(p)
            return _done(async_op)
        parts = [torch.empty_like(input) for _ in range(world)]
        dist.all_gather(parts, input.contiguous(), group=group)
        torch.cat(parts, out=output)
        return _done(async_op)

    @functools.wraps(orig_reduce_scatter_tensor)
    def reduce_scatter_tensor(output, input, op=dist.ReduceOp.SUM, group=None, async_op=False):
        if not _is_gloo(group):
            return orig_reduce_scatter_tensor(output, input, op=op, group=group, async_op=async_op)
        if _alone(group):  # any reduction over one rank is its input
            output.copy_(input.reshape(output.shape))
            return _done(async_op)
        world = dist.get_world_size(group)
        rank = dist.get_rank(group)
        full = input.contiguous().clone()
        dist.all_reduce(full, op=op, group=group)
        output.copy_(full.reshape(world, -1)[rank].reshape(output.shape))
        return _done(async_op)

    orig_all_gather = dist.all_gather
    orig_reduce_scatter = dist.reduce_scatter

    @functools.wraps(orig_all_gather)
    def all_gather(tensor_list, tensor, group=None, async_op=False):
        if _is_gloo(group) and _alone(group):
            tensor_list[0].copy_(tensor)
            return _done(async_op)
        shapes = {tuple(t.shape) for t in tensor_list}
        if not _is_gloo(group) or len(shapes) == 1 and tuple(tensor.shape) in shapes:
            return orig_all_gather(tensor_list, tensor, group=group, async_op=async_op)
        # Uneven first dimensions (MoE token gathers): pad to the largest, gather, trim.
        longest = max(t.shape[0] for t in tensor_list)
        padded = tensor.new_zeros((longest,) + tuple(tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        parts = [torch.empty_like(padded) for _ in tensor_list]
        orig_all_gather(parts, padded, group=group)
        for out, part in zip(tensor_list, parts):
            out.copy_(part[: out.shape[0]])
        return _done(async_op)

    @functools.wraps(orig_reduce_scatter)
    def reduce_scatter(output, input_list, op=dist.ReduceOp.SUM, group=None, async_op=False):
        if not _is_gloo(group):
            return orig_reduce_scatter(output, input_list, op=op, group=group, async_op=async_op)
        if _alone(group):
            output.copy_(input_list[0])
            return _done(async_op)
        # gloo has no reduce_scatter: all-reduce everything, keep this rank's part.
        sizes = [t.shape[0] for t in input_list]
        full = torch.cat([t.contiguous() for t in input_list])
        dist.all_reduce(full, op=op, group=group)
        output.copy_(torch.split(full, sizes)[dist.get_rank(group)])
        return _done(async_op)

    orig_coalescing_manager = dist._coalescing_manager

    @contextlib.contextmanager
    def _coalescing_manager(group=None, device=None, async_ops=False):
        # gloo would queue the collectives issued inside and run them on exit, after the emulated
        # ones above have already read their (not yet reduced) results: run each one eagerly.
        if _is_gloo(group):
            yield _CompletedWork()
            return
        with orig_coalescing_manager(group, device, async_ops) as cm:
            yield cm

    orig_gather = dist.gather

    @functools.wraps(orig_gather)
    def gather(tensor, gather_list=None, dst=None, group=None, async_op=False, **kwargs):
        if _is_gloo(group) and _alone(group):
            if gather_list:
                gather_list[0].copy_(tensor)
            return _done(async_op)
        return orig_gather(tensor, gather_list, dst, group=group, async_op=async_op, **kwargs)

    # megatron keeps references to some of these from its import: each counts as the collective the code made
    all_gather, reduce_scatter, all_to_all_single, all_gather_into_tensor, reduce_scatter_tensor, gather = (
        call_counts.counted(f) for f in (all_gather, reduce_scatter, all_to_all_single, all_gather_into_tensor,
                                         reduce_scatter_tensor, gather))
    dist._coalescing_manager = _coalescing_manager
    # torch's object collectives (all_gather_object, gather_object) call these module functions of
    # distributed_c10d, not the package's attributes: both get the group-of-one path
    dist.gather = distributed_c10d.gather = gather
    dist.all_gather = distributed_c10d.all_gather = all_gather
    dist.reduce_scatter = reduce_scatter
    dist.all_to_all_single = all_to_all_single
    dist.all_gather_into_tensor = all_gather_into_tensor
    dist.reduce_scatter_tensor = reduce_scatter_tensor
    dist._all_gather_base = all_gather_into_tensor
    dist._reduce_scatter_base = reduce_scatter_tensor


class _CompletedWork:
    def wait(self, *a, **k):
        return True

    def is_completed(self):
        return True


def _split_sizes(sizes, total, world):
    if sizes is None:
        return [total // world] * world
    return [int(s) for s in sizes]


def _all_to_all_via_p2p(outputs, inputs, group) -> None:
    """all_to_all with uneven sizes on gloo: every pair exchanges with isend/irecv."""
    rank = dist.get_rank(group)
    world = dist.get_world_size(group)
    ops = []
    for peer in range(world):
        if peer == rank:
            outputs[peer].copy_(inputs[peer])
            continue
        global_peer = dist.get_global_rank(group, peer) if group is not None else peer
        if inputs[peer].numel():
            ops.append(dist.P2POp(dist.isend, inputs[peer], global_peer, group))
        if outputs[peer].numel():
            ops.append(dist.P2POp(dist.irecv, outputs[peer], global_peer, group))
    if ops:
        for work in dist.batch_isend_irecv(ops):
            work.wait()


def _eager_compile() -> None:
    """``torch.compile`` hands back what it is given: megatron's fusions (``jit_fuser``) and anything else
    compiled in this process run eagerly, op for op as written. Replacing the function, rather than
    disabling dynamo, also spares every process that imports megatron the import of dynamo and inductor
    (~1.3 s; a process that steps a torch optimizer still imports dynamo there, ~0.35 s)."""

    def eager(model=None, **_options):
        return model if model is not None else (lambda fn: fn)

    torch.compile = eager


def install() -> bool:
    """Install the emulation once (idempotent); returns whether it is active in this process."""
    global _INSTALLED
    if _INSTALLED:
        return True
    if not is_needed():
        return False
    if any(name == "megatron.core" or name.startswith("megatron.core.") for name in sys.modules):
        raise RuntimeError(
            "r1mega's CPU emulation must be installed before megatron.core is imported: import "
            "r1mega.models (or call r1mega.platform.megatron_compat.ensure_megatron()) first."
        )
    _patch_torch_cuda()
    _patch_placement()
    _patch_collectives()
    _eager_compile()
    _INSTALLED = True
    log.warning("CUDA unavailable: running megatron-core on CPU through r1mega's emulation layer (gloo).")
    return True
