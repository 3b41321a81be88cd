"""Chat messages as the chat template takes them. Torch-free."""

from __future__ import annotations

from inlaid.protocol import ChatMessage, chat_template_role


def template_messages(messages: list[ChatMessage] | list[dict[str, str]]) -> list[dict[str, str]]:
    """The messages as the chat template takes them: each role by the SDK's and the HTTP
    front's rule (`chat_template_role`: "developer" is "system"; another role is refused, not
    pasted into the template), so a raw Generate is served as they would serve it. ValueError
    for a message without a role and a text content, or with another role."""
    chat = []
    for index, message in enumerate(messages):
        if isinstance(message, ChatMessage):  # a Generate's, as decoded (its types checked)
            role, content = message.role, message.content
        elif isinstance(message, dict) and "role" in message and isinstance(message.get("content"), str):
            role, content = message["role"], message["content"]
        else:
            raise ValueError(f"messages[{index}] must have a role and a text content")
        chat.append({"role": chat_template_role(role, f"messages[{index}]"), "content": content})
    return chat
