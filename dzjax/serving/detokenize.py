"""Incremental detokenization with stop strings: the text of a growing list of tokens, reported
piece by piece.

Each new token decodes only the tokens since the last complete character, against the same
tokens without the new one (never the whole output again); nothing is reported while a multi-byte
character is incomplete. A stop string is looked for only where it could end in the new text, and
text that may be the start of a stop string is held back until it is known not to be one, so a
stop string never reaches the client, even in pieces.
"""

from __future__ import annotations


class TextStream:
    """The text of `token_ids` (a list the caller appends to), with stop strings.

        stream = TextStream(tokenizer, token_ids, stop=("\\n\\n",))
        token_ids.append(t); piece, stopped = stream.push()
    """

    def __init__(self, tokenizer, token_ids: list[int], stop: tuple[str, ...] = ()):
        self.tokenizer, self.token_ids, self.stop = tokenizer, token_ids, tuple(stop)
        self.text = ""  # the output so far (cut before a stop string once one is found)
        self.emitted = 0  # characters of `text` already reported
        self._prefix = self._read = 0  # token offsets: decoded context, and tokens read so far
        self._longest = max(map(len, self.stop), default=0)

    def push(self) -> tuple[str, bool]:
        """After the caller appended a token: the text that can be reported now, and whether a
        stop string was found (the text then ends before it)."""
        grown = len(self.text)
        self.text += self._new_text()
        stopped = False
        if self.stop:  # a stop string can only end in the new text (or straddle into it)
            start = max(0, grown - self._longest + 1)
            found = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if found:
                self.text, stopped = self.text[:min(found)], True
        safe = len(self.text) if stopped else len(self.text) - self._held_back()
        piece, self.emitted = self.text[self.emitted:safe], max(self.emitted, safe)
        return piece, stopped

    def rest(self) -> str:
        """What is still held back, when the output ends for another reason than a stop."""
        piece, self.emitted = self.text[self.emitted:], len(self.text)
        return piece

    def _held_back(self) -> int:
        """Characters at the end of the text that may be the start of a stop string."""
        held = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), held, -1):
                if self.text.endswith(s[:k]):
                    held = k
                    break
        return held

    def _new_text(self) -> str:
        tok = self.tokenizer
        before = tok.decode(self.token_ids[self._prefix:self._read], skip_special_tokens=True)
        after = tok.decode(self.token_ids[self._prefix:], skip_special_tokens=True)
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self.token_ids)
        return after[len(before):]
