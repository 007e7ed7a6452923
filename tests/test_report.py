"""The one table renderer and the one bar-chart renderer that every report goes through."""

from polyalign.eval.report import bar_chart, language_rows, render_table, results_table


def test_markdown_table_and_language_rows():
    rows = language_rows({"en": {"asr": 0.25, "n": 8}, "th": {"asr": 0.5, "n": 8}}, [("n", "n"), ("asr", "ASR")])
    assert rows == [["en", "8", "25.0%"], ["th", "8", "50.0%"]]
    assert render_table(["language", "n", "ASR"], rows).splitlines() == [
        "| language | n | ASR |", "|---|---|---|", "| en | 8 | 25.0% |", "| th | 8 | 50.0% |"]


def test_rich_table_has_the_same_cells():
    res = {"task": "t", "model": "m", "task_kind": "mmlu", "languages": {"en": {"n": 4, "accuracy": 0.75}}}
    table = results_table(res, style="rich")
    assert [c.header for c in table.columns] == ["language", "n", "accuracy"]
    assert [list(c.cells) for c in table.columns] == [["en"], ["4"], ["75.0%"]]
    assert "| en | 4 | 75.0% |" in results_table(res)


def test_bar_chart_writes_one_png_with_a_panel_per_entry(tmp_path):
    from PIL import Image

    one, two = tmp_path / "one.png", tmp_path / "two.png"
    series = {"before": {"en": 10.0, "th": 50.0}, "after": {"en": 20.0, "th": 40.0}}
    bar_chart(one, [("a", series)])
    bar_chart(two, [("a", series), ("b", series)])
    assert Image.open(two).width > 1.5 * Image.open(one).width


def test_model_card_carries_the_results_tables():
    """`polyalign export --results RUN` puts each run's per-language table into the card."""
    from polyalign.export import model_card

    res = {"task": "builtin-harmful", "judge": "lexicon", "languages": {"en": {"asr": 0.25, "refusal": 0.75}}}
    card = model_card({"base_model": "m", "recipe": {"method": "msd"}}, [res])
    assert "## builtin-harmful (judge: lexicon)" in card
    assert "| language | asr | refusal |\n|---|---|---|\n| en | 25.0% | 75.0% |" in card
