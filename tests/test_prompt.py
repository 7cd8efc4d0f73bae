"""Prompt strings against the spec's literal strings (spec 4.2), and <image> expansion."""
import pytest

from pllava import prompt
from pllava.prompt import (
    DEFAULT_QUESTION,
    TEMPLATES,
    ConversationTemplate,
    build_prompt,
    expand_image_tokens,
    render,
)

# Typed independently of pllava/prompt.py, from spec 4.2 (and the reference sources it cites).
# Spelled with explicit "\n" so that no editor can strip the significant trailing spaces.
DEMO_SYSTEM = (
    "You are a powerful Video Magic ChatBot, a large vision-language assistant. \n"
    "You are able to understand the video content that the user provides and assist the user in a video-language related task.\n"
    "The user might provide you with the video and maybe some extra noisy information to help you out or ask you a question. Make use of the information in a proper way to be competent for the job.\n"
    "### INSTRUCTIONS:\n"
    "1. Follow the user's instruction.\n"
    "2. Be critical yet believe in yourself.\n"
)

RECAPTION_SYSTEM = (
    "You are a powerful Video Magic ChatBot, a large vision-language assistant. \n"
    "You are able to understand the video content that the user provides and assist the user in a video recaptioning task.\n"
    "The user will provide you with the video and maybe some extra noisy information to help you out. Make use of the information in a proper way to be competent for the recaption job\n"
    "### INSTRUCTIONS:\n"
    "1. Follow the user's instruction.\n"
    "2. Be critical yet believe in yourself.\n"
)

MINDSPORE_SYSTEM = (
    "You are a powerful Video Magic ChatBot, a large vision-language assistant.\n"
    "    You are able to understand the video content that the user provides and assist the user in a video-language related task.\n"
    "    The user might provide you with the video and maybe some extra noisy information to help you out or ask you a question.\n"
    "    Make use of the information in a proper way to be competent for the job.\n"
    "    ### INSTRUCTIONS:\n"
    "    1. Follow the user's instruction.\n"
    "    2. Be critical yet believe in yourself.\n"
    "    "
)


def test_demo_system_text_is_verbatim():
    assert prompt.SYSTEM_DEMO == DEMO_SYSTEM
    first_line = DEMO_SYSTEM.split("\n")[0]
    assert first_line.endswith("assistant. ")  # the trailing space of line 1
    assert DEMO_SYSTEM.endswith("yourself.\n")


def test_plain_is_the_default_and_matches_the_demo_string():
    q = "What is the person doing?"
    expected = DEMO_SYSTEM + " USER:<image>  USER:" + q + " ASSISTANT:"
    assert build_prompt(q) == expected
    assert build_prompt(q, "plain") == expected
    assert "<image>  USER:" in expected and "USER:What" in expected  # two spaces; none after USER:


def test_plain_with_default_question():
    assert DEFAULT_QUESTION == "Describe the video in details."
    assert build_prompt(DEFAULT_QUESTION) == (
        DEMO_SYSTEM + " USER:<image>  USER:Describe the video in details. ASSISTANT:"
    )


def test_simple_prompt():
    assert build_prompt(DEFAULT_QUESTION, "simple") == "USER:<image> Describe the video in details. ASSISTANT:"


def test_recaption_prompt():
    assert prompt.SYSTEM_RECAPTION == RECAPTION_SYSTEM
    query = prompt.RECAPTION_QUERY
    assert query.startswith("You are to assist me in accomplishing a task about the input video.")
    assert query.endswith("# Task\nDescribe the background, characters and the actions in the provided video.\n")
    assert build_prompt(query, "recaption") == RECAPTION_SYSTEM + " USER: <image>\n USER: " + query + " ASSISTANT:"


def test_mindspore_prompt():
    assert prompt.SYSTEM_MINDSPORE == MINDSPORE_SYSTEM
    assert MINDSPORE_SYSTEM.endswith("\n    ")
    q = prompt.MINDSPORE_QUESTION
    assert q == "What is shown in this video?"
    assert build_prompt(q, "mindspore") == MINDSPORE_SYSTEM + "USER: " + q + " </s> USER:<image> ASSISTANT:"


def test_system_override_and_empty_system():
    assert build_prompt("Q?", "plain", system="") == "USER:<image>  USER:Q? ASSISTANT:"
    assert build_prompt("Q?", "plain", system="Be brief.") == "Be brief. USER:<image>  USER:Q? ASSISTANT:"
    assert build_prompt("Q?", "simple", system="S.") == "S. USER:<image> Q? ASSISTANT:"


def test_every_template_has_exactly_one_image_token():
    for name in TEMPLATES:
        assert build_prompt("Anything?", name).count("<image>") == 1, name


def test_rules_of_get_prompt():
    roles, seps = ("U:", "A:"), ("|", "#")
    # final user message: role + msg + sep + assistant role
    assert render("S", roles, seps, [("U:", "hi")]) == "S|U:hi|A:"
    # non-final messages get their role's separator; a final assistant message is a prefix
    assert render("S", roles, seps, [("U:", "q"), ("A:", "a"), ("U:", "q2"), ("A:", "pre")]) == (
        "S|U:q|A:a#U:q2|A:pre"
    )
    assert render("", roles, seps, [("U:", "q")]) == "U:q|A:"


def test_query_pre_and_post_prompts_join_with_a_space():
    tpl = ConversationTemplate("", ("U:", "A:"), (" ", "</s>"), "<image>", "mm_interleaf", "PRE", "POST")
    assert tpl.user_messages("q") == [("U:", "<image> PRE q POST")]


def test_bad_inputs():
    with pytest.raises(ValueError, match="unknown prompt template"):
        build_prompt("q", "nope")
    with pytest.raises(ValueError, match="must not contain"):
        build_prompt("look at <image> please")
    with pytest.raises(ValueError, match="must not contain"):
        build_prompt("q", system="<image>")
    with pytest.raises(ValueError, match="style"):
        ConversationTemplate("", ("U:", "A:"), (" ", " "), "<image>", "mm_sideways")


def test_templates_are_frozen():
    with pytest.raises(AttributeError):
        TEMPLATES["plain"].system = "x"  # type: ignore[misc]
    with pytest.raises(TypeError):
        TEMPLATES["x"] = TEMPLATES["plain"]  # type: ignore[index]


# -- expand_image_tokens -------------------------------------------------------------------

IMG = 32000


def test_expand_image_tokens_positions():
    ids = [1, 11, 12, IMG, 13, 14]
    out, start = expand_image_tokens(ids, IMG, 4)
    assert start == 3
    assert out == [1, 11, 12, IMG, IMG, IMG, IMG, 13, 14]
    assert len(out) == len(ids) - 1 + 4
    assert out[start:start + 4] == [IMG] * 4
    assert ids == [1, 11, 12, IMG, 13, 14]  # input untouched


def test_expand_image_tokens_at_the_edges():
    assert expand_image_tokens([IMG], IMG, 3) == ([IMG, IMG, IMG], 0)
    assert expand_image_tokens([1, IMG], IMG, 2) == ([1, IMG, IMG], 1)
    assert expand_image_tokens((1, IMG, 5), IMG, 1) == ([1, IMG, 5], 1)


def test_expand_image_tokens_real_size():
    ids = [1] + [7] * 50 + [IMG] + [8] * 10
    out, start = expand_image_tokens(ids, IMG, 2304)  # 16 frames pooled to 16x12x12
    assert start == 51 and len(out) == len(ids) - 1 + 2304 == 2365 and out.count(IMG) == 2304


def test_expand_image_tokens_errors():
    with pytest.raises(ValueError, match="exactly one <image>.*found 0"):
        expand_image_tokens([1, 2, 3], IMG, 4)
    with pytest.raises(ValueError, match=r"found 2 \(at positions \[1, 3\]\)"):
        expand_image_tokens([1, IMG, 2, IMG], IMG, 4)
    with pytest.raises(ValueError, match="num_visual_tokens"):
        expand_image_tokens([1, IMG], IMG, 0)


def test_a_request_without_a_question_asks_what_its_template_is_for():
    assert prompt.default_question("recaption") == prompt.RECAPTION_QUERY
    assert prompt.default_question("plain") == prompt.default_question("simple") == prompt.DEFAULT_QUESTION
    assert prompt.RECAPTION_QUERY in prompt.build_prompt(prompt.default_question("recaption"), "recaption")
