"""PLLaVA prompt strings (spec 4.1, 4.2) and the ``<image>`` placeholder expansion.

The templates are data; the strings come out of the reference ``Conversation`` rules
(spec 4.1), re-implemented in :func:`render`:

- ``ret = system + seps[0]`` (or "" when the system prompt is empty);
- each non-final message adds ``role + message + sep[role]``;
- a final user message adds ``role + message + sep[role] + roles[1]``;
- a final assistant message (an answer prefix) adds ``role + message``.

The default template is ``"plain"``: the official demo path (``scripts/demo.sh``,
``--conv_mode plain``), with the demo system prompt and the video uploaded as its own user
turn before the question::

    SYSTEM + " USER:<image>  USER:" + question + " ASSISTANT:"

Other templates: ``"recaption"`` (``eval_recaption``), ``"simple"`` (recaption
``single_test``: plain, no system prompt) and ``"mindspore"`` (the MindSpore port's
hand-written ``pllavarun.py`` string, which puts the video after the question).
"""
from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping, Sequence

IMAGE_TOKEN = "<image>"

#: The question for dense video captioning.
DEFAULT_QUESTION = "Describe the video in details."

#: The demo system prompt, verbatim: line 1 ends with "assistant. " (a trailing space).
SYSTEM_DEMO = (
    "You are a powerful Video Magic ChatBot, a large vision-language assistant. \n"
    "You are able to understand the video content that the user provides and assist the user in a "
    "video-language related task.\n"
    "The user might provide you with the video and maybe some extra noisy information to help you out "
    "or ask you a question. Make use of the information in a proper way to be competent for the job.\n"
    "### INSTRUCTIONS:\n"
    "1. Follow the user's instruction.\n"
    "2. Be critical yet believe in yourself.\n"
)

#: The recaption system prompt (``SYSTEM_RECAPTION``); its line 3 has no final full stop.
SYSTEM_RECAPTION = (
    "You are a powerful Video Magic ChatBot, a large vision-language assistant. \n"
    "You are able to understand the video content that the user provides and assist the user in a "
    "video recaptioning task.\n"
    "The user will provide you with the video and maybe some extra noisy information to help you out. "
    "Make use of the information in a proper way to be competent for the recaption job\n"
    "### INSTRUCTIONS:\n"
    "1. Follow the user's instruction.\n"
    "2. Be critical yet believe in yourself.\n"
)

#: The recaption instruction (``infer_recaption``'s query), spelling mistakes included.
RECAPTION_QUERY = (
    "You are to assist me in accomplishing a task about the input video. Reply to me with a precise yet "
    "detailed response. For how you would succeed in the recaptioning task, read the following Instructions "
    "section and Then, make your response with a elaborate paragraph.\n"
    "# Instructions\n"
    "1. Avoid providing over detailed information such as color, counts of any objects as you are terrible "
    "regarding observing these details\n"
    "2. Instead, you should carefully go over the provided video and reason about key information about the "
    "overall video\n"
    "3. If you are not sure about something, do not include it in you response.\n"
    "# Task\n"
    "Describe the background, characters and the actions in the provided video.\n"
)

#: The MindSpore port's system prompt: a triple-quoted string indented inside ``main()``, so
#: every line after the first starts with 4 spaces and the string ends with "\n    ".
SYSTEM_MINDSPORE = (
    "You are a powerful Video Magic ChatBot, a large vision-language assistant.\n"
    "    You are able to understand the video content that the user provides and assist the user in a "
    "video-language related task.\n"
    "    The user might provide you with the video and maybe some extra noisy information to help you out "
    "or ask you a question.\n"
    "    Make use of the information in a proper way to be competent for the job.\n"
    "    ### INSTRUCTIONS:\n"
    "    1. Follow the user's instruction.\n"
    "    2. Be critical yet believe in yourself.\n"
    "    "
)

#: The MindSpore port's default question (``pllavarun.py --question``).
MINDSPORE_QUESTION = "What is shown in this video?"

# How the video joins the user's question (the reference ``MultiModalConvStyle`` plus the
# two call orders the entry points use):
MM_INTERLEAF = "mm_interleaf"  # one user turn: f"{mm_token} {question}"
MM_ALONE = "mm_alone"  # mm_token as its own user turn, then the question turn
MM_UPLOAD_FIRST = "mm_upload_first"  # demo: upload_video() adds an interleaf turn with an empty
#                                      query (f"{mm_token} "), then ask() adds the question turn
MM_AFTER_QUERY = "mm_after_query"  # MindSpore: the question turn, then mm_token as its own turn
STYLES = (MM_INTERLEAF, MM_ALONE, MM_UPLOAD_FIRST, MM_AFTER_QUERY)


@dataclass(frozen=True)
class ConversationTemplate:
    """One prompt format: the fields of the reference ``Conversation`` it is built from.

    ``seps[i]`` follows a message of ``roles[i]``; ``seps[0]`` also follows the system
    prompt. ``pre_query_prompt`` / ``post_query_prompt`` are joined to the question with a
    space (``f"{pre} {q}"``, ``f"{q} {post}"``), as in ``Conversation.user_query``.
    """

    system: str
    roles: tuple[str, str]
    seps: tuple[str, str]
    mm_token: str
    style: str
    pre_query_prompt: str | None = None
    post_query_prompt: str | None = None

    def __post_init__(self):
        if self.style not in STYLES:
            raise ValueError(f"unknown multimodal style {self.style!r}; expected one of {STYLES}")
        if len(self.roles) != 2 or len(self.seps) != 2:
            raise ValueError("roles and seps must be (user, assistant) pairs")
        if self.mm_token.count(IMAGE_TOKEN) != 1:
            raise ValueError(f"mm_token must contain {IMAGE_TOKEN!r} exactly once, got {self.mm_token!r}")

    def user_messages(self, question: str) -> list[tuple[str, str]]:
        """The user turns (role, message) that carry the video and ``question``."""
        user = self.roles[0]
        query = question
        if self.post_query_prompt is not None:
            query = f"{query} {self.post_query_prompt}"
        if self.pre_query_prompt is not None:
            query = f"{self.pre_query_prompt} {query}"
        if self.style == MM_INTERLEAF:
            return [(user, f"{self.mm_token} {query}")]
        if self.style == MM_ALONE:
            return [(user, self.mm_token), (user, query)]
        if self.style == MM_UPLOAD_FIRST:
            return [(user, f"{self.mm_token} "), (user, query)]
        return [(user, query), (user, self.mm_token)]  # MM_AFTER_QUERY


def render(system: str, roles: Sequence[str], seps: Sequence[str], messages: Sequence[tuple[str, str]]) -> str:
    """``Conversation.get_prompt`` (spec 4.1) over ``(role, message)`` pairs."""
    sep = dict(zip(roles, seps))
    ret = system + sep[roles[0]] if system != "" else ""
    for i, (role, message) in enumerate(messages):
        if i + 1 < len(messages):
            ret += role + message + sep[role]
        elif role != roles[-1]:  # the last turn is the user's: hand over to the assistant
            ret += role + message + sep[role] + roles[-1]
        else:  # the last turn is an assistant prefix: the model continues it
            ret += role + message
    return ret


_PLAIN_ROLES = ("USER:", "ASSISTANT:")
_PLAIN_SEPS = (" ", "</s>")

TEMPLATES: Mapping[str, ConversationTemplate] = MappingProxyType(
    {
        # conv_plain_v1 with the demo's system prompt and call order (spec 4.2 "Demo").
        "plain": ConversationTemplate(SYSTEM_DEMO, _PLAIN_ROLES, _PLAIN_SEPS, IMAGE_TOKEN, MM_UPLOAD_FIRST),
        # conv_eval_recaption: roles with a space after "USER:", "<image>\n" as its own turn.
        "recaption": ConversationTemplate(
            SYSTEM_RECAPTION, ("USER: ", "ASSISTANT:"), _PLAIN_SEPS, IMAGE_TOKEN + "\n", MM_ALONE
        ),
        # conv_plain_v1 as single_test uses it: no system prompt, video and question in one turn.
        "simple": ConversationTemplate("", _PLAIN_ROLES, _PLAIN_SEPS, IMAGE_TOKEN, MM_INTERLEAF),
        # pllavarun.py's literal SYSTEM_MS + "USER: " + q + " </s> USER:<image> ASSISTANT:" written
        # in the same rules: the system separator " " supplies the last of SYSTEM_MS's 4 trailing
        # spaces, pre_query_prompt "" gives the space after "USER:", post_query_prompt the "</s>".
        "mindspore": ConversationTemplate(
            SYSTEM_MINDSPORE[:-1], _PLAIN_ROLES, _PLAIN_SEPS, IMAGE_TOKEN, MM_AFTER_QUERY,
            pre_query_prompt="", post_query_prompt="</s>",
        ),
    }
)
DEFAULT_TEMPLATE = "plain"


def get_template(name: str) -> ConversationTemplate:
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ValueError(f"unknown prompt template {name!r}; known: {sorted(TEMPLATES)}") from None


def default_question(template: str) -> str:
    """What a request without a question asks: the recaption template's own instruction,
    otherwise the dense-captioning question."""
    return RECAPTION_QUERY if template == "recaption" else DEFAULT_QUESTION


def build_prompt(question: str, template: str = DEFAULT_TEMPLATE, system: str | None = None) -> str:
    """The prompt text for one video and ``question``.

    ``template`` defaults to ``"plain"`` (the official demo). ``system`` replaces the
    template's system prompt (``""`` for none); it is followed by the template's first
    separator, as in the reference. The result holds exactly one ``<image>``.
    """
    tpl = get_template(template)
    sys_prompt = tpl.system if system is None else system
    for what, text in (("question", question), ("system prompt", sys_prompt)):
        if IMAGE_TOKEN in text:
            raise ValueError(f"the {what} must not contain {IMAGE_TOKEN!r}: the template places the video itself")
    return render(sys_prompt, tpl.roles, tpl.seps, tpl.user_messages(question))


def expand_image_tokens(
    ids: Sequence[int], image_token_id: int, num_visual_tokens: int
) -> tuple[list[int], int]:
    """Replace the single ``<image>`` id by ``num_visual_tokens`` copies of it.

    Returns ``(expanded_ids, image_start)``: the visual embeddings go to positions
    ``image_start .. image_start + num_visual_tokens - 1`` of ``expanded_ids``, whose length
    is ``len(ids) - 1 + num_visual_tokens`` (spec 2.4). Expanding before the model runs keeps
    positions and KV slots static. PLLaVA feeds one video per prompt, so ``ids`` must hold
    exactly one image id.
    """
    if num_visual_tokens < 1:
        raise ValueError(f"num_visual_tokens must be >= 1, got {num_visual_tokens}")
    positions = [i for i, t in enumerate(ids) if t == image_token_id]
    if len(positions) != 1:
        where = f" (at positions {positions})" if positions else ""
        raise ValueError(
            f"the prompt must contain exactly one {IMAGE_TOKEN} token (id {image_token_id}), "
            f"found {len(positions)}{where}"
        )
    start = positions[0]
    expanded = [*ids[:start], *([image_token_id] * num_visual_tokens), *ids[start + 1:]]
    return expanded, start
