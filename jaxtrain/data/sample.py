"""The documents a BPE is trained on: every training document, or, when they exceed
`--tokenizer-sample` bytes, a deterministic sample of them.

The sample is a bottom-k by hash: order the training documents by sha1(key) (key = the
id the split hashes: a text file's relative path, a record's id or FILE#ROW, records.py)
and take the longest prefix of that order whose bytes fit the budget. Which documents are
chosen is then a function of the corpus alone: not of the number of workers, the order of
files, or how the corpus is cut into units; and sha1 makes the sample a uniform draw over
documents, unrelated to their names' order.

One streaming pass keeps it exactly, in memory bounded by the budget: hold the documents
seen whose hash is below `bound`; when their bytes exceed the budget, drop the largest
hash and lower `bound` to it. A dropped document can never return: every document with a
smaller hash only adds to the bytes before it, so its prefix never fits again; and every
document below `bound` is held, so what is held is always a prefix of the hash order.

Under the budget nothing is ever dropped and the documents are returned in the order
read (plan order), exactly the documents and order a prepare without a sample trains on,
so BPE stores of corpora under the budget are unchanged. Over it, the sample is also
returned in plan order (the trainer counts words, so the order matters little).
"""

from __future__ import annotations

import hashlib
import heapq
from typing import Iterable, Iterator

from jaxtrain.config.errors import DataError
from jaxtrain.data.corpus import is_val
from jaxtrain.data.plan import Unit
from jaxtrain.data.records import Bad, Fields
from jaxtrain.data.units import iter_unit

DEFAULT_BUDGET = 1 << 30


def training_documents(units: list[Unit], fields: Fields, val_fraction: float,
                       strict: bool) -> Iterator[tuple[str, bytes]]:
    """(key, bytes) of every training document, in plan order; with `strict`, the first
    bad record is a DataError (else bad and empty records are left to the map to count)."""
    for unit in units:
        for record in iter_unit(unit, fields):
            if isinstance(record, Bad):
                if strict:
                    raise DataError(f"--strict: {record.message()}")
            elif isinstance(record, tuple) and not is_val(record[0], val_fraction):
                yield record


def bottom_k(documents: Iterable[tuple[str, bytes]], budget: int) -> tuple[list[bytes], dict]:
    """(the sample's documents in the order read, what it holds of how many)."""
    held: list[tuple[int, int, bytes]] = []  # max-heap on hash: (-hash, position, document)
    bound, size, seen, seen_bytes = None, 0, 0, 0
    for position, (key, data) in enumerate(documents):
        seen, seen_bytes = seen + 1, seen_bytes + len(data)
        digest = int.from_bytes(hashlib.sha1(key.encode()).digest(), "big")
        if bound is not None and digest >= bound:
            continue
        heapq.heappush(held, (-digest, position, data))
        size += len(data)
        while size > budget:
            negative, _, dropped = heapq.heappop(held)
            size, bound = size - len(dropped), -negative
    if seen and not held:
        raise DataError(f"--tokenizer-sample {budget}: smaller than the first training document in hash order")
    chosen = [data for _, _, data in sorted(held, key=lambda item: item[1])]
    return chosen, {"documents": len(chosen), "bytes": size, "of_documents": seen, "of_bytes": seen_bytes,
                    "budget": budget}
