"""The OpenAI-compatible HTTP front end (``pllava-openai``): ``POST /v1/chat/completions``
with a ``video_url`` (or ``image_url``) content part, answered by a PLLaVA decoder over gRPC.

It holds no model: every caption is one ``Decoder.Caption`` call made with
:class:`pllava_client.Client`, so the front end scales on its own and imports no MindSpore.

``settings``: :class:`OpenAISettings` (YAML < ``PLLAVA_OPENAI_*`` < flags).
``chat_request``: a chat-completions JSON body -> :class:`ChatRequest` (checks, no I/O).
``media``: a ``video_url``/``image_url`` URL -> the media bytes (data URLs; files and
downloads only where the operator allows them).
``api_errors``: the OpenAI error shape, and gRPC statuses -> HTTP statuses.
``auth``: the optional bearer tokens.
``bridge``: a decoder caption stream driven from asyncio, cancelled when the HTTP client leaves.
``responses``: the completion, chunk and usage objects.
``app``: the FastAPI application; ``server``: the command line and uvicorn.
"""
