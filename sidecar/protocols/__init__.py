"""Client protocols other than OpenAI chat completions, each translated in one module to and
from the gateway's lingua franca (OpenAI chat, :mod:`sidecar.types`):

    messages.py   Anthropic's Messages API inbound (``POST /v1/messages``)
    responses.py  OpenAI's Responses API, stateless (``POST /v1/responses``): requests
    responses_answers.py  its answers and stream events

Pure (no I/O): the HTTP front end decodes a body with them, runs the gateway, and renders
what comes back with them.
"""
