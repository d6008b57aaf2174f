"""docs/results.md sections: each benchmark script rewrites its own section and leaves the others alone."""

from __future__ import annotations

from benchmarks.report import TITLE, write_section


def test_sections_are_replaced_in_place_and_kept_in_order(tmp_path):
    path = tmp_path / "results.md"
    write_section(path, "train_speed", "speed v1")
    write_section(path, "reproduction", "table v1")  # placed before train_speed although written after it
    path.write_text(path.read_text() + "\nhand-written note\n")
    write_section(path, "tuning", "trials v1")
    write_section(path, "reproduction", "table v2\nwith two lines")
    text = path.read_text()
    assert text.startswith(TITLE)
    assert "table v1" not in text and "table v2\nwith two lines" in text
    assert text.index("table v2") < text.index("trials v1") < text.index("speed v1")
    assert "hand-written note" in text
    assert text.count("<!-- section:reproduction ") == 1 and text.count("<!-- /section:reproduction -->") == 1
    assert not list(tmp_path.glob("*.tmp"))
