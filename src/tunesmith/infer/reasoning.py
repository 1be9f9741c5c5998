"""A generated answer's reasoning block, split from its text as it streams (the API's `reasoning_content`).

The block is the text between the opening and closing reasoning tags at the start of the answer; where the
generation prompt already opened it (QwQ, DeepSeek-R1 style templates), the answer starts inside it. Text that
does not start with a block is all content. Pieces are held back only while they could still be the start of a
tag, so streaming stays live.
"""

from __future__ import annotations


class ReasoningSplitter:
    def __init__(self, tags: tuple[str, str], opened: bool = False):
        self.open_tag, self.close_tag = tags
        self.mode = "reasoning" if opened else "start"  # start | reasoning | content
        self.buffer = ""
        self.after_open = True  # drop the newlines that follow the opening tag
        self.after_close = False  # and those that follow the closing tag
        self.saw_block = opened

    def feed(self, piece: str) -> list[tuple[str, str]]:
        """[(kind, text)] ready to send, kind being `reasoning` or `content`."""
        self.buffer += piece
        out: list[tuple[str, str]] = []
        while True:
            if self.mode == "start":
                head = self.buffer.lstrip()
                if head.startswith(self.open_tag):
                    self.buffer, self.mode, self.saw_block = head[len(self.open_tag):].lstrip("\n"), "reasoning", True
                    continue
                if head and not self.open_tag.startswith(head):
                    self.mode = "content"
                    continue
                return out  # still undecided
            if self.mode == "reasoning":
                if self.after_open:
                    self.buffer = self.buffer.lstrip("\n")
                    if not self.buffer:
                        return out
                    self.after_open = False
                at = self.buffer.find(self.close_tag)
                if at >= 0:
                    text = self.buffer[:at].rstrip("\n")
                    if text:
                        out.append(("reasoning", text))
                    self.buffer, self.mode, self.after_close = self.buffer[at + len(self.close_tag):], "content", True
                    continue
                keep = _partial_suffix(self.buffer, self.close_tag)
                ready = self.buffer[: len(self.buffer) - keep].rstrip("\n")  # newlines may precede the tag
                if ready:
                    out.append(("reasoning", ready))
                self.buffer = self.buffer[len(ready):]
                return out
            if self.after_close:
                self.buffer = self.buffer.lstrip("\n")
                if not self.buffer:
                    return out
                self.after_close = False
            if self.buffer:
                out.append(("content", self.buffer))
            self.buffer = ""
            return out

    def finish(self) -> list[tuple[str, str]]:
        """Whatever is held back once the answer has ended."""
        if not self.buffer:
            return []
        kind = "reasoning" if self.mode == "reasoning" else "content"
        text, self.buffer = self.buffer, ""
        return [(kind, text)]


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a beginning of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


def split_answer(text: str, tags: tuple[str, str], opened: bool = False) -> tuple[str | None, str]:
    """(reasoning or None, content) of a whole answer."""
    splitter = ReasoningSplitter(tags, opened)
    parts = splitter.feed(text) + splitter.finish()
    reasoning = "".join(t for kind, t in parts if kind == "reasoning")
    content = "".join(t for kind, t in parts if kind == "content")
    return (reasoning if splitter.saw_block else None), content
