"""Top-k expert choice exactly as torch.topk makes it on CPU, ties included.

torch.topk (ATen's CPU topk_impl_loop) puts (value, index) pairs in index
order and runs libstdc++'s std::partial_sort over them when k * 64 <= n,
else std::nth_element to position k - 1 and std::sort of the first k - 1,
all with the comparator "value greater", which never looks at the index.
Among equal values the pick therefore depends on those algorithms' swaps:
measured, topk([.1, .3, .3, .1, .3, .1, .2, .3], 3) chooses experts 4, 7
and 1, not 1, 2 and 4. A router whose probabilities tie across the k-th
place (a router of zeros, as transformers initialises Qwen2-MoE's) must
choose the same experts as transformers, so `torch_topk` replays those
algorithms step for step on plain lists. It is slow Python, and only needed
when two of the k + 1 largest values tie: `top_k` takes numpy's fast path
otherwise, where the choice and its order are unambiguous.
"""
from __future__ import annotations

import numpy as np

_THRESHOLD = 16  # libstdc++'s _S_threshold: insertion sort below it


def _greater(a: tuple[float, int], b: tuple[float, int]) -> bool:
    return a[0] > b[0]


def _insertion_sort(q: list[tuple[float, int]], first: int, last: int) -> None:
    if first == last:
        return
    for i in range(first + 1, last):
        val = q[i]
        if _greater(val, q[first]):
            q[first + 1:i + 1] = q[first:i]
            q[first] = val
        else:  # __unguarded_linear_insert
            j = i
            while _greater(val, q[j - 1]):
                q[j] = q[j - 1]
                j -= 1
            q[j] = val


def _move_median_to_first(q: list[tuple[float, int]], result: int, a: int, b: int, c: int) -> None:
    if _greater(q[a], q[b]):
        if _greater(q[b], q[c]):
            q[result], q[b] = q[b], q[result]
        elif _greater(q[a], q[c]):
            q[result], q[c] = q[c], q[result]
        else:
            q[result], q[a] = q[a], q[result]
    elif _greater(q[a], q[c]):
        q[result], q[a] = q[a], q[result]
    elif _greater(q[b], q[c]):
        q[result], q[c] = q[c], q[result]
    else:
        q[result], q[b] = q[b], q[result]


def _unguarded_partition_pivot(q: list[tuple[float, int]], first: int, last: int) -> int:
    mid = first + (last - first) // 2
    _move_median_to_first(q, first, first + 1, mid, last - 1)
    pivot, lo, hi = first, first + 1, last
    while True:
        while _greater(q[lo], q[pivot]):
            lo += 1
        hi -= 1
        while _greater(q[pivot], q[hi]):
            hi -= 1
        if not lo < hi:
            return lo
        q[lo], q[hi] = q[hi], q[lo]
        lo += 1


def _adjust_heap(q: list[tuple[float, int]], first: int, hole: int, length: int, value: tuple[float, int]) -> None:
    top = hole
    second = hole
    while second < (length - 1) // 2:
        second = 2 * (second + 1)
        if _greater(q[first + second], q[first + second - 1]):
            second -= 1
        q[first + hole] = q[first + second]
        hole = second
    if length % 2 == 0 and second == (length - 2) // 2:
        second = 2 * (second + 1)
        q[first + hole] = q[first + second - 1]
        hole = second - 1
    parent = (hole - 1) // 2  # __push_heap
    while hole > top and _greater(q[first + parent], value):
        q[first + hole] = q[first + parent]
        hole = parent
        parent = (hole - 1) // 2
    q[first + hole] = value


def _make_heap(q: list[tuple[float, int]], first: int, last: int) -> None:
    length = last - first
    if length < 2:
        return
    parent = (length - 2) // 2
    while True:
        _adjust_heap(q, first, parent, length, q[first + parent])
        if parent == 0:
            return
        parent -= 1


def _pop_heap(q: list[tuple[float, int]], first: int, last: int, result: int) -> None:
    value = q[result]
    q[result] = q[first]
    _adjust_heap(q, first, 0, last - first, value)


def _heap_select(q: list[tuple[float, int]], first: int, middle: int, last: int) -> None:
    _make_heap(q, first, middle)
    for i in range(middle, last):
        if _greater(q[i], q[first]):
            _pop_heap(q, first, middle, i)


def _sort_heap(q: list[tuple[float, int]], first: int, last: int) -> None:
    while last - first > 1:
        last -= 1
        _pop_heap(q, first, last, last)


def _partial_sort(q: list[tuple[float, int]], first: int, middle: int, last: int) -> None:
    _heap_select(q, first, middle, last)
    _sort_heap(q, first, middle)


def _depth_limit(n: int) -> int:
    return 2 * (n.bit_length() - 1)


def _introsort_loop(q: list[tuple[float, int]], first: int, last: int, depth: int) -> None:
    while last - first > _THRESHOLD:
        if depth == 0:
            _partial_sort(q, first, last, last)
            return
        depth -= 1
        cut = _unguarded_partition_pivot(q, first, last)
        _introsort_loop(q, cut, last, depth)
        last = cut


def _sort(q: list[tuple[float, int]], first: int, last: int) -> None:
    if first == last:
        return
    _introsort_loop(q, first, last, _depth_limit(last - first))
    if last - first > _THRESHOLD:  # __final_insertion_sort
        _insertion_sort(q, first, first + _THRESHOLD)
        for i in range(first + _THRESHOLD, last):  # __unguarded_insertion_sort
            val, j = q[i], i
            while _greater(val, q[j - 1]):
                q[j] = q[j - 1]
                j -= 1
            q[j] = val
    else:
        _insertion_sort(q, first, last)


def _nth_element(q: list[tuple[float, int]], first: int, nth: int, last: int) -> None:
    if first == last or nth == last:
        return
    depth = _depth_limit(last - first)
    while last - first > 3:
        if depth == 0:
            _heap_select(q, first, nth + 1, last)
            q[first], q[nth] = q[nth], q[first]
            return
        depth -= 1
        cut = _unguarded_partition_pivot(q, first, last)
        if cut <= nth:
            first = cut
        else:
            last = cut
    _insertion_sort(q, first, last)


def torch_topk(values: np.ndarray, k: int) -> np.ndarray:
    """The indices torch.topk(values, k) returns on CPU (largest, sorted), ties included."""
    q = [(float(v), i) for i, v in enumerate(values)]
    n = len(q)
    if k * 64 <= n:
        _partial_sort(q, 0, k, n)
    else:
        _nth_element(q, 0, k - 1, n)
        _sort(q, 0, k - 1)
    return np.array([i for _, i in q[:k]], dtype=np.intp)


def top_k(values: np.ndarray, k: int) -> np.ndarray:
    """Per row of values (T, n), the indices of its k largest, (T, k), largest first,
    choosing among ties as torch.topk does (docs/design.md §5, routing)."""
    T, n = values.shape
    order = np.argsort(-values, axis=1, kind="stable")  # descending; equal values by index
    chosen = order[:, :k].copy()
    top = np.take_along_axis(values, order[:, :min(k + 1, n)], axis=1)
    for t in np.nonzero((top[:, 1:] == top[:, :-1]).any(axis=1))[0]:  # a tie among them: torch's pick and order
        chosen[t] = torch_topk(values[t], k)
    return chosen
