"""`with Thing(...) as thing:` for the classes that hold a socket or fd and have `close()`."""

from __future__ import annotations

from typing import Self


class Closing:
    """Closes on leaving the `with` block, whatever ends it."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
