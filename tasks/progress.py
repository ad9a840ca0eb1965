"""Progress of one archive run: the share of its bytes formed, never decreasing, below 100."""

from __future__ import annotations


class Progress:
    """Byte shares from the files' lengths; equal shares per file where lengths are unknown."""

    def __init__(self, files: int) -> None:
        self.sizes: list[int | None] = [None] * files
        self.received: list[int] = [0] * files
        self.done: list[bool] = [False] * files
        self.best = 0

    def opened(self, index: int, size: int | None) -> None:
        """File `index` answered, with this length if it said one."""
        self.sizes[index] = size

    def add(self, index: int, count: int) -> None:
        """`count` more bytes of file `index` went into the archive."""
        self.received[index] += count

    def finished(self, index: int) -> None:
        """File `index` is complete (its length may only now be known)."""
        self.done[index] = True
        self.sizes[index] = self.received[index]

    def percent(self) -> int:
        """min(99, share formed), never lower than an earlier answer."""
        self.best = max(self.best, min(99, int(self._share() * 100)))
        return self.best

    def _share(self) -> float:
        known = [size for size in self.sizes if size is not None]
        if not known or not sum(known):
            return sum(self.done) / len(self.sizes) if self.sizes else 0.0
        # Files not opened yet are guessed at the mean length of those that were.
        mean = sum(known) / len(known)
        total = sum(size if size is not None else mean for size in self.sizes)
        pairs = zip(self.received, self.sizes, strict=True)
        return sum(min(got, size) for got, size in pairs if size is not None) / total
