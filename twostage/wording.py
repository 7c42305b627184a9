"""Counts in messages people read: "1 document", "2 documents"."""


def count_of(n: int, noun: str, plural: str | None = None) -> str:
    return f"{n} {noun if n == 1 else plural or noun + 's'}"
