"""docs/troubleshooting.md quotes the pipeline's own error messages: each one it explains
must still be raised somewhere in pipeline/, or the page is explaining a message no user
meets any more."""

from __future__ import annotations

import re

from tests.conftest import ROOT


def quoted_messages() -> list[str]:
    page = (ROOT / "docs" / "troubleshooting.md").read_text()
    own, _ = page.split("## Messages from DVC and torch")  # the page's own messages end there
    return re.findall(r"^### `(.+)`$", own, flags=re.M)


def test_every_message_the_page_explains_is_still_in_the_code():
    source = "\n".join(path.read_text() for path in (ROOT / "pipeline").rglob("*.py"))
    flat = re.sub(r'"\s*\n\s*f?"', "", source)  # messages split over lines of adjacent literals
    messages = quoted_messages()
    assert len(set(messages)) == len(messages), "a message explained twice"
    missing = [message for message in messages if message not in flat]
    assert not missing, f"docs/troubleshooting.md explains messages the code no longer has: {missing}"
