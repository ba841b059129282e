"""``GET /v1/prompt``: the prompt context an LLM service sends to its model (docs/contracts.md §2).

Built by :func:`rekku.prompt.build_prompt`; this module only maps query parameters to it.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query

from rekku.auth import require_token
from rekku.prompt import PromptResponse, build_prompt
from rekku.schemas import ErrorResponse

Id = Annotated[str | None, Query(max_length=191)]

router = APIRouter(dependencies=[Depends(require_token)])


@router.get("/v1/prompt", response_model=PromptResponse, responses={401: {"model": ErrorResponse}})
def get_prompt(interface: Annotated[str | None, Query(max_length=64)] = None, chat_id: Id = None,
               thread_id: Id = None, user_id: Id = None,
               username: Annotated[str | None, Query(max_length=256)] = None, message_id: Id = None,
               text: Annotated[str, Query(max_length=8000, description="the incoming message")] = "",
               max_chars: Annotated[int | None, Query(ge=1000, description="character budget of the answer "
                                                      "(default REKKU_PROMPT_MAX_CHARS)")] = None) -> Any:
    """Context (time, weather, participants, diary, chat history, plugins' injections), the input
    block, the instructions and the actions, within the character budget (the diary is dropped first)."""
    return build_prompt(interface=interface, chat_id=chat_id, thread_id=thread_id, user_id=user_id,
                        username=username, message_id=message_id, text=text, max_chars=max_chars)
