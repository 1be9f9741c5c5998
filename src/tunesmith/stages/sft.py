"""sft: next-token prediction on the assistant turns of conversations (the template marks them)."""

from __future__ import annotations

from tunesmith.stages.base import Stage
from tunesmith.stages.pt import build

# The same objective as pt; the data kind (conversations through the chat template) is what differs.
STAGE = Stage("sft", rows="chat", build=build, predict="generate", shards=lambda cfg: True)
