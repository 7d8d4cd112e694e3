"""Ragged tensors: batches of variable-length lists stored as flat values plus offsets."""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["RaggedTensor"]


def _index(value: Any, name: str, where: str) -> int:
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{where}: {name} must be an int, got {type(value).__name__}") from None


def _is_integer_dtype(dtype: torch.dtype) -> bool:
    return not dtype.is_floating_point and not dtype.is_complex and dtype != torch.bool


class RaggedTensor:
    r"""A batch of variable-length lists (e.g. the IDs of a multi-valued feature).

    The entries of all lists are stored back to back in the 1-D tensor ``values``; ``offsets``
    says where each list starts and ends. Row ``i`` of a two-dimensional ragged tensor is
    ``values[offsets[i]:offsets[i + 1]]``. An optional ``weight`` holds one floating weight per
    value. For example, three samples with the IDs ``[10, 11]``, ``[]`` and ``[12, 13, 14]``::

        sample 0: ids [10, 11]        weights [1.0, 0.5]
        sample 1: ids []              weights []
        sample 2: ids [12, 13, 14]    weights [0.2, 0.3, 0.5]

                    row 0      row 2
                   +------+ +----------+
        values  = [ 10, 11,  12, 13, 14 ]         (len 5)
        weight  = [1.0, 0.5, 0.2, 0.3, 0.5]       (one per value)
        offsets = [ 0,   2,   2,   5 ]            (batch size + 1 entries)
                    ^    ^    ^    ^
                    |    |    |    +-- end of row 2 == len(values)
                    |    |    +------- row 2 starts at 2
                    |    +------------ row 0 ends at 2, row 1 = [2, 2) is empty
                    +----------------- always 0

        to_dense(default_value=0), shape (3, 3) = (batch size, longest row):
            [[10, 11,  0],
             [ 0,  0,  0],
             [12, 13, 14]]

    More ragged levels are given as a list of offsets, outermost first. Each level's
    entries index the rows of the next level; the last level indexes ``values``. A tensor
    with ``k`` offsets levels has rank ``k + 1``: its dense form has shape
    ``(batch, max_len_level_0, ..., max_len_level_{k-1})``.

    Args:
        values (Tensor): 1-D tensor of all entries, of any dtype.
        offsets (Tensor or sequence of Tensor): one 1-D integer tensor per ragged level. Each
            starts at 0, never decreases, and ends at the number of rows of the next level
            (``len(next_offsets) - 1``), or at ``len(values)`` for the last level. Must be on
            the same device as ``values``.
        weight (Tensor, optional): 1-D floating tensor with one weight per value, on the same
            device as ``values``. Default: ``None``.
        dense_shape (sequence of int, optional): shape of the dense form, one entry per
            dimension (``len(offsets) + 1``). ``-1`` entries are resolved from the data
            (see :meth:`real_shape`); fixed entries must equal the batch size for dimension 0
            and be at least the longest row elsewhere. Default: all ``-1``.
        validate (bool, keyword-only): check the offsets' contents (start, monotonicity,
            ends) and fixed ``dense_shape`` entries. Structural checks (ranks, dtypes, devices,
            lengths) always run. Turning this off avoids reading offsets back from an
            accelerator. Default: ``True``.

    Example::

        >>> rt = RaggedTensor(torch.tensor([10, 11, 12, 13, 14]), torch.tensor([0, 2, 2, 5]))
        >>> rt.shape
        (3, 3)
        >>> rt.to_dense()
        tensor([[10, 11,  0],
                [ 0,  0,  0],
                [12, 13, 14]])
        >>> RaggedTensor.from_dense(rt.to_dense()).offsets()
        [tensor([0, 2, 2, 5])]
    """

    def __init__(
        self,
        values: torch.Tensor,
        offsets: torch.Tensor | Sequence[torch.Tensor],
        weight: torch.Tensor | None = None,
        dense_shape: Sequence[int] | None = None,
        *,
        validate: bool = True,
    ) -> None:
        where = "RaggedTensor"
        self._check_values(values, where)
        if isinstance(offsets, torch.Tensor):
            offsets = [offsets]
        elif isinstance(offsets, (list, tuple)):
            offsets = list(offsets)
        else:
            raise TypeError(
                f"{where}: offsets must be a Tensor or a list of Tensors, "
                f"got {type(offsets).__name__}"
            )
        if not offsets:
            raise ValueError(f"{where}: offsets must contain at least one level, got []")
        for level, offs in enumerate(offsets):
            name = f"offsets[{level}]"
            if not isinstance(offs, torch.Tensor):
                raise TypeError(f"{where}: {name} must be a Tensor, got {type(offs).__name__}")
            if not _is_integer_dtype(offs.dtype):
                raise TypeError(f"{where}: {name} must have an integer dtype, got {offs.dtype}")
            if offs.dim() != 1:
                raise ValueError(f"{where}: {name} must be 1-D, got shape {tuple(offs.shape)}")
            if offs.numel() < 1:
                raise ValueError(f"{where}: {name} must have at least 1 entry, got 0")
            if offs.device != values.device:
                raise ValueError(
                    f"{where}: {name} must be on the device of values ({values.device}), "
                    f"got {offs.device}"
                )
        if validate:
            self._check_offsets_contents(values, offsets, where)

        self._values = values
        self._offsets = offsets
        self._weight = None
        if weight is not None:
            self._check_weight(weight, values, where)
            self._weight = weight

        rank = len(offsets) + 1
        if dense_shape is None:
            self._dense_shape: tuple[int, ...] = (-1,) * rank
        else:
            self._dense_shape = self._check_dense_shape(dense_shape, rank, where)
            if validate:
                for d, size in enumerate(self._dense_shape):
                    if size != -1:
                        self._check_fixed_dim(d, size, where)

    # ----------------------------------------------------------------------------- validation

    @staticmethod
    def _check_values(values: Any, where: str) -> None:
        if not isinstance(values, torch.Tensor):
            raise TypeError(f"{where}: values must be a Tensor, got {type(values).__name__}")
        if values.dim() != 1:
            raise ValueError(f"{where}: values must be 1-D, got shape {tuple(values.shape)}")

    @staticmethod
    def _check_offsets_contents(
        values: torch.Tensor, offsets: list[torch.Tensor], where: str
    ) -> None:
        for level, offs in enumerate(offsets):
            name = f"offsets[{level}]"
            first = int(offs[0].item())
            if first != 0:
                raise ValueError(f"{where}: {name} must start at 0, got {first}")
            if offs.numel() > 1 and bool((offs[1:] < offs[:-1]).any().item()):
                raise ValueError(f"{where}: {name} must be non-decreasing, got {offs.tolist()}")
            end = int(offs[-1].item())
            if level + 1 < len(offsets):
                expected = offsets[level + 1].numel() - 1
                what = f"the number of rows of offsets[{level + 1}] (len - 1)"
            else:
                expected = values.numel()
                what = "len(values)"
            if end != expected:
                raise ValueError(f"{where}: {name} must end at {what} = {expected}, got {end}")

    @staticmethod
    def _check_weight(weight: Any, values: torch.Tensor, where: str) -> None:
        if not isinstance(weight, torch.Tensor):
            raise TypeError(
                f"{where}: weight must be a Tensor or None, got {type(weight).__name__}"
            )
        if not weight.dtype.is_floating_point:
            raise TypeError(f"{where}: weight must have a floating dtype, got {weight.dtype}")
        if weight.dim() != 1:
            raise ValueError(f"{where}: weight must be 1-D, got shape {tuple(weight.shape)}")
        if weight.numel() != values.numel():
            raise ValueError(
                f"{where}: weight must have one entry per value ({values.numel()}), "
                f"got {weight.numel()}"
            )
        if weight.device != values.device:
            raise ValueError(
                f"{where}: weight must be on the device of values ({values.device}), "
                f"got {weight.device}"
            )

    @staticmethod
    def _check_dense_shape(dense_shape: Any, rank: int, where: str) -> tuple[int, ...]:
        if isinstance(dense_shape, (str, bytes)) or not isinstance(dense_shape, Sequence):
            raise TypeError(
                f"{where}: dense_shape must be a sequence of ints, got {type(dense_shape).__name__}"
            )
        shape = tuple(_index(d, "dense_shape entries", where) for d in dense_shape)
        if len(shape) != rank:
            raise ValueError(
                f"{where}: dense_shape must have {rank} entries (len(offsets) + 1), got {shape}"
            )
        if any(d < -1 for d in shape):
            raise ValueError(f"{where}: dense_shape entries must be >= -1, got {shape}")
        return shape

    def _actual_dim(self, dim: int) -> int:
        """Size of dimension ``dim`` computed from the offsets alone."""
        if dim == 0:
            return self._offsets[0].numel() - 1
        offs = self._offsets[dim - 1]
        if offs.numel() < 2:
            return 0
        return int((offs[1:] - offs[:-1]).max().item())

    def _check_fixed_dim(self, dim: int, size: int, where: str) -> None:
        actual = self._actual_dim(dim)
        if dim == 0 and size != actual:
            raise ValueError(
                f"{where}: dense_shape[0] must equal the batch size {actual}, got {size}"
            )
        if size < actual:
            raise ValueError(
                f"{where}: dense_shape[{dim}] must be at least the longest row ({actual}), "
                f"got {size}"
            )

    def _normalize_dim(self, dim: Any, where: str) -> int:
        dim = _index(dim, "dim", where)
        rank = self.dim
        if not -rank <= dim < rank:
            raise IndexError(f"{where}: dim must be in [{-rank}, {rank - 1}], got {dim}")
        return dim % rank

    # ----------------------------------------------------------------------------- accessors

    def values(self) -> torch.Tensor:
        """The flat 1-D tensor of all entries."""
        return self._values

    def offsets(self) -> list[torch.Tensor]:
        """The offsets, one 1-D integer tensor per ragged level, outermost first."""
        return self._offsets

    def weight(self) -> torch.Tensor | None:
        """The per-value weights, or ``None``."""
        return self._weight

    def set_values(self, values: torch.Tensor) -> None:
        """Replace the values, keeping the offsets.

        Args:
            values (Tensor): 1-D tensor with as many entries as the current values, on the
                same device (its dtype may differ).
        """
        where = "RaggedTensor.set_values"
        self._check_values(values, where)
        if values.numel() != self._values.numel():
            raise ValueError(
                f"{where}: values must have {self._values.numel()} entries to match the "
                f"offsets, got {values.numel()}"
            )
        if values.device != self._values.device:
            raise ValueError(
                f"{where}: values must be on {self._values.device}, got {values.device}"
            )
        self._values = values

    def set_weight(self, weight: torch.Tensor | None) -> None:
        """Replace the per-value weights (``None`` removes them).

        Args:
            weight (Tensor, optional): 1-D floating tensor, one entry per value, on the
                device of the values.
        """
        if weight is not None:
            self._check_weight(weight, self._values, "RaggedTensor.set_weight")
        self._weight = weight

    def lengths(self, level: int = -1) -> torch.Tensor:
        """Row lengths of one ragged level (default: the innermost).

        Args:
            level (int): index into :meth:`offsets`. Default: ``-1``.

        Returns:
            1-D tensor ``offsets[level][1:] - offsets[level][:-1]``.

        Example::

            >>> RaggedTensor(torch.arange(3), torch.tensor([0, 2, 2, 3])).lengths()
            tensor([2, 0, 1])
        """
        where = "RaggedTensor.lengths"
        level = _index(level, "level", where)
        n = len(self._offsets)
        if not -n <= level < n:
            raise IndexError(f"{where}: level must be in [{-n}, {n - 1}], got {level}")
        offs = self._offsets[level]
        return offs[1:] - offs[:-1]

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the values."""
        return self._values.dtype

    @property
    def device(self) -> torch.device:
        """Device of the values (offsets and weights live there too)."""
        return self._values.device

    @property
    def dim(self) -> int:
        """Rank of the dense form, ``len(offsets()) + 1``."""
        return len(self._offsets) + 1

    @property
    def dense_shape(self) -> tuple[int, ...]:
        """The stored dense shape, possibly with ``-1`` entries (see :meth:`real_shape`)."""
        return self._dense_shape

    def set_dim_by_rank(self, dim: int, rank: int) -> None:
        """Fix the size of dimension ``rank`` of the dense form to ``dim`` (``-1`` unfixes it).

        Args:
            dim (int): the size; ``-1`` or, for dimension 0, the batch size, or at least the
                longest row for the others.
            rank (int): which dimension.
        """
        where = "RaggedTensor.set_dim_by_rank"
        size = _index(dim, "dim", where)
        rank = self._normalize_dim(rank, where)
        if size < -1:
            raise ValueError(f"{where}: dim must be >= -1, got {size}")
        if size != -1:
            self._check_fixed_dim(rank, size, where)
        shape = list(self._dense_shape)
        shape[rank] = size
        self._dense_shape = tuple(shape)

    def get_shape(self, dim: int) -> int:
        """Size of one dimension of the dense form.

        A fixed ``dense_shape`` entry is returned as is; a ``-1`` entry resolves to the batch
        size (``len(offsets[0]) - 1``) for dimension 0, and to the longest row of
        ``offsets[dim - 1]`` (0 when there are no rows) otherwise.

        Args:
            dim (int): the dimension, negative values count from the end.
        """
        dim = self._normalize_dim(dim, "RaggedTensor.get_shape")
        size = self._dense_shape[dim]
        return self._actual_dim(dim) if size == -1 else size

    def real_shape(self, start: int = 0, end: int | None = None) -> tuple[int, ...]:
        """Shape of the dense form over dimensions ``[start, end)``, ``-1`` entries resolved.

        Args:
            start (int): first dimension. Default: ``0``.
            end (int, optional): one past the last dimension; negative values count from the
                end, ``None`` means all. Default: ``None``.

        Example::

            >>> rt = RaggedTensor(torch.arange(6), torch.tensor([0, 2, 5, 6]))
            >>> rt.real_shape(), rt.real_shape(0, 1), rt.real_shape(1)
            ((3, 3), (3,), (3,))
        """
        where = "RaggedTensor.real_shape"
        start = _index(start, "start", where)
        if end is not None:
            end = _index(end, "end", where)
        return tuple(self.get_shape(d) for d in range(self.dim)[start:end])

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the dense form, ``real_shape()``."""
        return self.real_shape()

    def size(self) -> tuple[int, ...]:
        """Shape of the dense form, ``real_shape()``."""
        return self.real_shape()

    @property
    def max_length(self) -> int:
        """Size of the last dimension of the dense form (the longest innermost row)."""
        return self.get_shape(-1)

    # ----------------------------------------------------------------------------- conversions

    def _with(
        self,
        values: torch.Tensor,
        offsets: list[torch.Tensor],
        weight: torch.Tensor | None,
    ) -> RaggedTensor:
        """A new RaggedTensor from parts derived from already validated ones."""
        out = RaggedTensor.__new__(RaggedTensor)
        out._values = values
        out._offsets = offsets
        out._weight = weight
        out._dense_shape = self._dense_shape
        return out

    def to(self, *args: Any, **kwargs: Any) -> RaggedTensor:
        """Move to a device and/or convert the values to a dtype.

        Accepts the arguments of :meth:`torch.Tensor.to`: ``to(device)``, ``to(dtype)``,
        ``to(device, dtype)``, ``to(tensor)`` and the keywords ``device``, ``dtype``,
        ``non_blocking`` and ``copy``.

        .. note::
            Unlike RecIS, a dtype converts **only the values**. Offsets keep their integer
            dtype and weights keep their floating dtype; both only follow the device.

        Example::

            >>> rt = RaggedTensor(torch.tensor([1, 2, 3]), torch.tensor([0, 1, 3]))
            >>> rt.to(torch.float32).offsets()[0].dtype
            torch.int64
        """
        device, dtype, non_blocking, copy = self._parse_to(args, kwargs)
        values = self._values.to(device=device, dtype=dtype, non_blocking=non_blocking, copy=copy)
        offsets = [o.to(device=device, non_blocking=non_blocking, copy=copy) for o in self._offsets]
        weight = None
        if self._weight is not None:
            weight = self._weight.to(device=device, non_blocking=non_blocking, copy=copy)
        return self._with(values, offsets, weight)

    @staticmethod
    def _parse_to(args: tuple, kwargs: dict) -> tuple[Any, Any, bool, bool]:
        where = "RaggedTensor.to"
        device = kwargs.pop("device", None)
        dtype = kwargs.pop("dtype", None)
        non_blocking = bool(kwargs.pop("non_blocking", False))
        copy = bool(kwargs.pop("copy", False))
        if kwargs:
            raise TypeError(f"{where}: unexpected keyword arguments {sorted(kwargs)}")
        positional = list(args)
        if positional and isinstance(positional[0], torch.Tensor):
            other = positional.pop(0)
            device, dtype = other.device, other.dtype
        elif (
            positional
            and isinstance(positional[0], (str, torch.device, int))
            and not isinstance(positional[0], bool)
        ):
            device = positional.pop(0)
        if positional and isinstance(positional[0], torch.dtype):
            dtype = positional.pop(0)
        if positional and isinstance(positional[0], bool):
            non_blocking = positional.pop(0)
        if positional and isinstance(positional[0], bool):
            copy = positional.pop(0)
        if positional:
            raise TypeError(
                f"{where}: expected (device, dtype, non_blocking, copy) or (tensor), "
                f"got unexpected argument {positional[0]!r}"
            )
        if dtype is not None and not isinstance(dtype, torch.dtype):
            raise TypeError(f"{where}: dtype must be a torch.dtype, got {type(dtype).__name__}")
        if device is not None:
            device = torch.device(device)
        return device, dtype, non_blocking, copy

    def cuda(
        self, device: torch.device | int | str | None = None, non_blocking: bool = False
    ) -> RaggedTensor:
        """Move to a CUDA device (default: the current one). Dtypes are unchanged."""
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device())
        elif isinstance(device, int):
            device = torch.device("cuda", device)
        return self.to(device=device, non_blocking=non_blocking)

    def cpu(self) -> RaggedTensor:
        """Move to the CPU. Dtypes are unchanged."""
        return self.to(device=torch.device("cpu"))

    def pin_memory(self) -> RaggedTensor:
        """Copy values, offsets and weights to pinned (page-locked) CPU memory."""
        weight = None if self._weight is None else self._weight.pin_memory()
        return self._with(
            self._values.pin_memory(), [o.pin_memory() for o in self._offsets], weight
        )

    def clone(self) -> RaggedTensor:
        """Copy values, offsets and weights (like :meth:`torch.Tensor.clone`).

        .. note::
            RecIS's ``clone`` shares the tensors; this one copies them.
        """
        weight = None if self._weight is None else self._weight.clone()
        return self._with(self._values.clone(), [o.clone() for o in self._offsets], weight)

    def to_dense(self, default_value: float = 0) -> torch.Tensor:
        """Pad every row to the dense shape.

        Args:
            default_value (number): fill value of the padding, cast to :attr:`dtype`.
                Default: ``0``.

        Returns:
            Tensor of shape :attr:`shape` and dtype :attr:`dtype`. Weights are not included.

        Example::

            >>> rt = RaggedTensor(
            ...     torch.tensor([1, 2, 3, 4]),
            ...     [torch.tensor([0, 2, 3]), torch.tensor([0, 1, 1, 4])],
            ... )
            >>> rt.to_dense(-1)
            tensor([[[ 1, -1, -1],
                     [-1, -1, -1]],
            <BLANKLINE>
                    [[ 2,  3,  4],
                     [-1, -1, -1]]])
        """
        if not isinstance(default_value, numbers.Number):
            raise TypeError(
                "RaggedTensor.to_dense: default_value must be a number, "
                f"got {type(default_value).__name__}"
            )
        shape = self.real_shape()
        for d in range(self.dim):
            if self._dense_shape[d] != -1:
                self._check_fixed_dim(d, shape[d], "RaggedTensor.to_dense")
        device = self.device
        dense = torch.full((math.prod(shape),), default_value, dtype=self.dtype, device=device)
        n = self._values.numel()
        if n == 0:
            return dense.view(shape)
        # Walk from the values up to the batch dimension, accumulating the flat dense index.
        element = torch.arange(n, device=device)
        flat = torch.zeros(n, dtype=torch.long, device=device)
        stride = 1
        for level in range(len(self._offsets) - 1, -1, -1):
            offs = self._offsets[level].long()
            lengths = offs[1:] - offs[:-1]
            num_elements = (
                n if level == len(self._offsets) - 1 else self._offsets[level + 1].numel() - 1
            )
            parent = torch.repeat_interleave(
                torch.arange(lengths.numel(), device=device), lengths, output_size=num_elements
            )
            position = torch.arange(num_elements, device=device) - offs[parent]
            flat += position[element] * stride
            stride *= shape[level + 1]
            element = parent[element]
        flat += element * stride
        dense[flat] = self._values
        return dense.view(shape)

    @classmethod
    def from_dense(cls, dense: torch.Tensor, pad_value: float = 0) -> RaggedTensor:
        """Build a ragged tensor from a padded dense tensor.

        Along the last dimension, a row's trailing run of ``pad_value`` entries is padding
        and is dropped; ``pad_value`` entries followed by a real entry are kept. Along outer
        dimensions (for 3-D and higher inputs) trailing rows that are empty after this are
        dropped too. ``dense_shape`` is set to ``dense.shape``, so
        ``from_dense(x, p).to_dense(p)`` reproduces ``x``.

        Args:
            dense (Tensor): tensor with at least 2 dimensions; dimension 0 is the batch.
            pad_value (number): the padding value (NaN is supported). Default: ``0``.

        Example::

            >>> rt = RaggedTensor.from_dense(torch.tensor([[1, 0, 2, 0], [0, 0, 0, 0]]))
            >>> rt.values(), rt.offsets()
            (tensor([1, 0, 2]), [tensor([0, 3, 3])])
        """
        where = "RaggedTensor.from_dense"
        if not isinstance(dense, torch.Tensor):
            raise TypeError(f"{where}: dense must be a Tensor, got {type(dense).__name__}")
        if dense.dim() < 2:
            raise ValueError(
                f"{where}: dense must have at least 2 dimensions, got shape {tuple(dense.shape)}"
            )
        if not isinstance(pad_value, numbers.Number):
            raise TypeError(f"{where}: pad_value must be a number, got {type(pad_value).__name__}")
        device = dense.device
        if isinstance(pad_value, float) and math.isnan(pad_value):
            real = ~torch.isnan(dense)
        else:
            real = dense != pad_value

        def trailing_length(mask: torch.Tensor) -> torch.Tensor:
            # 1 + index of the last True along the last dim (0 if none).
            width = mask.shape[-1]
            if width == 0:
                return torch.zeros(mask.shape[:-1], dtype=torch.long, device=device)
            ranks = torch.arange(1, width + 1, device=device)
            return (mask.long() * ranks).amax(dim=-1)

        # lengths[k] has shape dense.shape[:k + 1]: the length of each row of level k.
        num_levels = dense.dim() - 1
        lengths = [trailing_length(real)]
        for _ in range(num_levels - 1):
            lengths.insert(0, trailing_length(lengths[0] > 0))

        offsets = []
        kept = torch.ones(dense.shape[:1], dtype=torch.bool, device=device)
        for k in range(num_levels):
            row_lengths = lengths[k][kept]
            offs = torch.zeros(row_lengths.numel() + 1, dtype=torch.long, device=device)
            torch.cumsum(row_lengths, dim=0, out=offs[1:])
            offsets.append(offs)
            width = dense.shape[k + 1]
            inside = torch.arange(width, device=device) < lengths[k].unsqueeze(-1)
            kept = kept.unsqueeze(-1) & inside
        values = dense[kept]
        return cls(values, offsets, dense_shape=tuple(dense.shape), validate=False)

    @classmethod
    def from_numpy(cls, values: Any, offsets: Any) -> RaggedTensor:
        """Build a ragged tensor from NumPy arrays (shares their memory).

        Args:
            values (numpy.ndarray): 1-D array of entries.
            offsets (numpy.ndarray or list of numpy.ndarray): offsets, one array per level.
        """
        if not isinstance(offsets, (list, tuple)):
            offsets = [offsets]
        return cls(torch.from_numpy(values), [torch.from_numpy(o) for o in offsets])

    def __repr__(self) -> str:
        weight = "None" if self._weight is None else repr(self._weight)
        return (
            f"RaggedTensor(values={self._values!r}, offsets={self._offsets!r}, "
            f"weight={weight}, dense_shape={self._dense_shape})"
        )
