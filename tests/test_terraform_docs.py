"""The README's lists of what forces replacement and what updates in place are the code's."""

from __future__ import annotations

import re

from infrasim_tui.terraform.resources import network, snapshot, vm, volume

from .conftest import REPO


def names_after(text: str, marker: str, stop: str) -> set[str]:
    start = text.index(marker) + len(marker)
    return set(re.findall(r"`([a-z_]+)`", text[start:text.index(stop, start)]))


def test_readme_lists_match_the_resources() -> None:
    readme = (REPO / "README.md").read_text()
    assert names_after(readme, "Force replacement:", "\n  - ") == set(vm.FORCES_REPLACEMENT)
    assert names_after(readme, "Update in place:", "\n- ") == set(vm.UPDATES_IN_PLACE)
    assert set(volume.UPDATES_IN_PLACE) == {"size"}
    restart = names_after(readme, "Update in place:", "a running VM is restarted")
    assert restart == set(vm.RESTART_REQUIRED)
    section = readme[readme.index("**`infrasim_network`**"):]
    section = section[:section.index("- **Plan:**")]
    for attr in (*network.FORCES_REPLACEMENT, *snapshot.FORCES_REPLACEMENT):
        assert f"`{attr}`" in section
