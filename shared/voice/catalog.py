"""The rules for a stored voice's id and free-text fields, the same in every service that keeps voices.

The speaker service enrols voices and the TTS service keeps character voices; both store them under a
client-chosen id (a file name on the server's disk) with a display name and labels that every
ListVoices returns. One set of rules, so an id valid for one service is valid for the other and one
AddVoice / Enroll cannot make every listing huge. Errors quote the client's input through
:func:`~dramaturg.shared.grpc.errors.echo`, bounded, so any input gives an error the client can read.
"""

from __future__ import annotations

import re

from dramaturg.shared.grpc.errors import echo, invalid_argument

MAX_VOICE_ID_CHARS = 64
# Matched with fullmatch: "$" alone also matches before a trailing newline, which let "alice\n" through
# as a file name.
VOICE_ID = re.compile(rf"[A-Za-z0-9_.-]{{1,{MAX_VOICE_ID_CHARS}}}")
MAX_DISPLAY_NAME_CHARS = 256
MAX_LABELS = 32
MAX_LABEL_KEY_CHARS = 63
MAX_LABEL_VALUE_CHARS = 256


def check_voice_id(voice_id: str, field_path: str = "voice_id") -> str:
    """Refuse an id that is not 1-64 of ``A-Z a-z 0-9 _ . -``: it names a file on the server's disk.

    The message says what is wrong (empty, how long, which characters).
    """
    if voice_id and VOICE_ID.fullmatch(voice_id):
        return voice_id
    rule = f"use 1–{MAX_VOICE_ID_CHARS} of A-Z a-z 0-9 _ . -"
    if not voice_id:
        raise invalid_argument(field_path, f"voice id is empty: {rule}")
    if len(voice_id) > MAX_VOICE_ID_CHARS:
        raise invalid_argument(field_path, f"voice id {echo(voice_id)} is too long; {rule}")
    raise invalid_argument(field_path, f"{echo(voice_id)} is not a valid voice id: {rule}")


def check_voice_fields(display_name: str, labels: dict[str, str]) -> None:
    """Bound the free-text fields a voice stores (display name, labels)."""
    if len(display_name) > MAX_DISPLAY_NAME_CHARS:
        raise invalid_argument(
            "display_name",
            f"is {len(display_name)} characters long; at most {MAX_DISPLAY_NAME_CHARS} are accepted",
        )
    if len(labels) > MAX_LABELS:
        raise invalid_argument("labels", f"{len(labels)} labels; at most {MAX_LABELS} are accepted")
    for key, value in labels.items():
        if not 0 < len(key) <= MAX_LABEL_KEY_CHARS:
            raise invalid_argument(
                "labels", f"label key {echo(key)} must be 1–{MAX_LABEL_KEY_CHARS} characters long"
            )
        if len(value) > MAX_LABEL_VALUE_CHARS:
            raise invalid_argument(
                f"labels[{echo(key)}]",
                f"is {len(value)} characters long; at most {MAX_LABEL_VALUE_CHARS} are accepted",
            )
