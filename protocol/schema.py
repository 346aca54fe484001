"""Value types shared by the swarm's signed schemas (records and the swarm config)."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, StringConstraints

Hex64 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
SWARM_ID_PATTERN = r"[0-9a-z][0-9a-z-]{2,63}"
SwarmId = Annotated[str, StringConstraints(pattern=f"^{SWARM_ID_PATTERN}$")]
ShortText = Annotated[str, StringConstraints(max_length=128)]
Maddr = Annotated[str, StringConstraints(pattern=r"^/[\x21-\x7e]{1,255}$")]


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
