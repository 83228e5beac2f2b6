"""The page's structure, read from the Blocks' config (no server): one tab strip at the top, the
Audit tab computed only when it is open, and a Space's controls bounded by the Space."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from app.tabs import Shared  # noqa: E402
from app.ui import build  # noqa: E402
from e3rl_core.errors import E3RLError  # noqa: E402


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    return build(runs_root=str(tmp_path_factory.mktemp("runs"))).config


@pytest.fixture(scope="module")
def space(tmp_path_factory):
    return build(space=True, runs_root=str(tmp_path_factory.mktemp("runs"))).config


def by_id(config: dict) -> dict[int, dict]:
    return {c["id"]: c for c in config["components"]}


def test_one_tab_strip_at_the_top_holds_every_tab(page):
    comps = by_id(page)
    strips = [c for c in comps.values() if c["type"] == "tabs"]
    assert len(strips) == 1
    top = page["layout"]["children"]
    # the page's title, then the strip: nothing of a tab above or beside it
    kinds = [comps[child["id"]]["type"] for child in top if comps[child["id"]]["type"] != "state"]
    assert kinds == ["markdown", "tabs"]
    strip = next(child for child in top if comps[child["id"]]["type"] == "tabs")
    # nothing but tabs in the strip: gradio's page counts a State between two tabs as a tab, and
    # clicking the next one then shows the wrong label and panel
    assert {comps[tab["id"]]["type"] for tab in strip["children"]} == {"tabitem"}
    labels = [comps[tab["id"]]["props"]["label"] for tab in strip["children"]]
    assert labels == ["Generate", "Audit", "Decision effects", "Train"]


def test_finished_generations_do_not_recompute_the_audit_tab(page):
    """The Audit tab's table, trace list, replay and what-if run when the tab opens or the user
    acts, never when the session's events change behind it."""
    comps = by_id(page)
    audit_table = next(i for i, c in comps.items() if c["props"].get("elem_id") == "e3rl-audit")
    states = {i for i, c in comps.items() if c["type"] == "state"}
    for dep in page["dependencies"]:
        changes = [t for t in dep["targets"] if t[1] == "change" and t[0] in states]
        assert not (changes and audit_table in dep["outputs"]), dep.get("api_name")
    tab = next(i for i, c in comps.items() if c["props"].get("elem_id") == "e3rl-audit-tab")
    assert any([tab, "select"] in [list(t) for t in d["targets"]] and audit_table in d["outputs"]
               for d in page["dependencies"])


def test_a_space_bounds_its_sliders_and_takes_a_typed_model_to_refuse_it(space, tmp_path):
    comps = by_id(space)
    steps = next(c for c in comps.values() if c["type"] == "slider" and c["props"].get("label") == "steps")
    assert steps["props"]["maximum"] == 30 and steps["props"]["value"] <= 30
    model = next(c for c in comps.values() if c["props"].get("elem_id") == "e3rl-model")
    assert model["props"]["allow_custom_value"]  # a typed name is kept, then refused with the reason
    from app.training import TrainingManager

    shared = Shared(store=None, trainer=TrainingManager(tmp_path), space=True, engine="thread",
                    default_model="checkpoints/arith-demo", shipped=["checkpoints/arith-demo"],
                    audit_dir=tmp_path, session_events=None, last_events=None)
    with pytest.raises(E3RLError, match=r"only the listed models can be used: '/etc/passwd' is not one of them "
                                        r"\(a Space runs offline"):
        shared.check_model("/etc/passwd", "used")
    shared.check_model("checkpoints/arith-demo", "used")
