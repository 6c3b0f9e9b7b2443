"""The static HTML report, checked in a real headless browser (Debian's chromium)."""

import base64
import io
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

from lightning_influence.reporting.html import write_html_report
from lightning_influence.results import InfluenceResult

NUM_QUERIES, NUM_TRAIN, SEQ_LEN, TOP = 2, 30, 6, 4
LAYERS = ["h.0.mlp", "h.1.mlp", "h.2.mlp"]
HOSTILE = '<script>alert("x")</script>'
CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
SKIP_REASON = "Debian's chromium is not installed (.ci/run installs it; sudo apt-get install -y chromium)"
IMAGE_CHECK = """<script>
window.addEventListener("load", () => {
  const imgs = Array.from(document.images);
  document.body.setAttribute("data-images", imgs.length);
  document.body.setAttribute("data-decoded", imgs.filter(i => i.complete && i.naturalWidth > 0).length);
});
</script>"""


def token_dataset():
    """Token sequences whose ids encode the example index, so rendered tables can be checked."""
    return [torch.tensor([1000 + i] + [7] * (SEQ_LEN - 1)) for i in range(NUM_TRAIN)]


def make_run():
    results = []
    for step in (50, 100):
        gen = torch.Generator().manual_seed(step)
        layer_scores = torch.randn(len(LAYERS), NUM_QUERIES, NUM_TRAIN, generator=gen)
        scores = layer_scores.sum(0)
        top = torch.topk(scores, TOP, dim=1)
        bottom = torch.topk(scores, TOP, dim=1, largest=False)
        results.append(InfluenceResult(
            scores=scores, query_ids=torch.tensor([3, 9]), layer_names=LAYERS, layer_scores=layer_scores,
            step=step, epoch=step // 50,
            top_ids=top.indices, bottom_ids=bottom.indices,
            top_token_scores=torch.randn(NUM_QUERIES, TOP, SEQ_LEN, generator=gen),
            bottom_token_scores=torch.randn(NUM_QUERIES, TOP, SEQ_LEN, generator=gen),
            meta={"strategy": "ekfac", "damping": 0.003, "note": HOSTILE},
        ))
    return results


class PageParser(HTMLParser):
    """Collects image sources, link targets and the training ids in each query's tables."""

    def __init__(self):
        super().__init__()
        self.images, self.links, self.tables, self.body_attrs = [], [], {}, {}
        self._table = None
        self._cells = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        if tag in ("a", "link") and "href" in attrs:
            self.links.append(attrs["href"])
        if tag == "body":
            self.body_attrs = attrs
        if tag == "table" and "data-query" in attrs:
            self._table = (int(attrs["data-query"]), attrs["class"])
            self.tables[self._table] = []
        if tag == "tr" and self._table is not None:
            self._cells = []
        if tag == "td" and self._cells is not None:
            self._cells.append("")

    def handle_data(self, data):
        if self._cells:
            self._cells[-1] += data

    def handle_endtag(self, tag):
        if tag == "tr" and self._cells:
            self.tables[self._table].append(self._cells)
        if tag == "tr":
            self._cells = None
        if tag == "table":
            self._table = None


def parse(page):
    parser = PageParser()
    parser.feed(page)
    return parser


def chromium(tmp_path, *args):
    profile = tmp_path / f"chromium-profile-{len(list(tmp_path.glob('chromium-profile-*')))}"
    proc = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}", *args],
        capture_output=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-2000:]
    return proc.stdout.decode()


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    results = make_run()
    out = write_html_report(results, tmp_path_factory.mktemp("report") / "report.html",
                            train_dataset=token_dataset(), query_dataset=token_dataset(), top_k=TOP)
    return results, out, out.read_text(encoding="utf-8")


def test_report_is_self_contained_and_escaped(report):
    _, _, page = report
    parsed = parse(page)
    assert parsed.images, "the report should embed plots"
    assert all(src.startswith("data:image/png;base64,") for src in parsed.images)
    assert all(href.startswith("#") for href in parsed.links)
    assert not re.search(r"(https?:)?//[\w.-]+\.\w", page), "no network references"
    assert "@import" not in page and "url(" not in page and "<script" not in page
    assert HOSTILE not in page and "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    for section in ("overview", "queries", "tail", "layers", "trajectory", "comparison"):
        assert f'<section id="{section}">' in page


def test_embedded_images_decode(report):
    from PIL import Image

    for src in parse(report[2]).images:
        image = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1], validate=True)))
        image.load()
        assert image.width > 10 and image.height > 10


def test_tables_list_the_top_examples_with_highlighted_tokens(report):
    results, _, page = report
    latest = results[-1]
    tables = parse(page).tables
    for which, largest in (("top", True), ("bottom", False)):
        expected = latest.top_k(TOP, largest=largest)
        for q, query_id in enumerate(latest.query_ids.tolist()):
            rows = tables[(query_id, which)]
            assert [int(row[1]) for row in rows] == expected.indices[q].tolist()
            torch.testing.assert_close(torch.tensor([float(row[2]) for row in rows]), expected.values[q],
                                       rtol=1e-3, atol=1e-4)
            # The rendered example is the training example with that id (its first token encodes it).
            assert [row[3].split()[0] for row in rows] == [str(1000 + i) for i in expected.indices[q].tolist()]
    assert page.count("background-color:rgba(") >= NUM_QUERIES * 2 * TOP  # token highlighting


def test_comparison_lists_entered_and_left_examples(report):
    from lightning_influence.analysis.compare import compare

    results, _, page = report
    comparison = compare(results[0], results[-1], top_k_changes=TOP)
    for query_id, entered, left in zip(comparison.query_ids, comparison.entered, comparison.left):
        row = f"<tr><td>{query_id}</td><td>{' '.join(map(str, entered))}</td><td>{' '.join(map(str, left))}</td></tr>"
        assert row in page
    assert "Top-4 changes per query" in page and "Jensen-Shannon" in page


@pytest.mark.skipif(CHROMIUM is None, reason=SKIP_REASON)
def test_report_renders_in_headless_chromium(report, tmp_path):
    results, path, page = report
    # A copy with a tiny script that records, in the DOM, how many images the browser decoded.
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", IMAGE_CHECK + "</body>"), encoding="utf-8")
    dom = chromium(tmp_path, "--virtual-time-budget=5000", "--dump-dom", probe.as_uri())
    parsed = parse(dom)
    assert int(parsed.body_attrs["data-images"]) == len(parse(page).images) > 0
    assert parsed.body_attrs["data-decoded"] == parsed.body_attrs["data-images"]
    top_ids = results[-1].top_k(TOP).indices[0].tolist()
    assert [int(row[1]) for row in parsed.tables[(3, "top")]] == top_ids

    from PIL import Image

    shot = tmp_path / "shot.png"
    chromium(tmp_path, f"--screenshot={shot}", "--window-size=1200,2000", "--hide-scrollbars", path.as_uri())
    assert shot.stat().st_size > 1000
    image = Image.open(shot).convert("L")
    assert image.size == (1200, 2000)
    assert len(image.getcolors(maxcolors=1 << 16) or range(1 << 16)) > 20, "screenshot looks blank"
    dark = sum(count for count, level in image.getcolors(maxcolors=256) if level < 128)
    assert dark > 1000, "no text or plots visible"


def test_report_from_a_run_directory_without_datasets(tmp_path):
    results = make_run()
    for r in results:
        r.save(tmp_path / "run" / f"step={r.step}")
    out = write_html_report(tmp_path / "run", tmp_path / "run.html", top_k=2)
    page = out.read_text(encoding="utf-8")
    tables = parse(page).tables
    assert [int(row[1]) for row in tables[(9, "top")]] == results[-1].top_k(2).indices[1].tolist()
    assert len(tables[(9, "top")][0]) == 3  # rank, id, score: no example column without a dataset
    assert "step=50" in page and "step=100" in page


def test_single_result_has_no_trajectory(tmp_path):
    result = make_run()[0]
    single = InfluenceResult(scores=result.scores, step=7)  # no layer scores either
    page = write_html_report(single, tmp_path / "one.html").read_text(encoding="utf-8")
    assert '<section id="trajectory">' not in page and '<section id="comparison">' not in page
    assert "no per-layer scores" in page
    with pytest.raises(ValueError, match="top_k"):
        write_html_report(single, tmp_path / "bad.html", top_k=0)


def test_image_examples_are_embedded(tmp_path):
    from PIL import Image

    images = [torch.rand(1, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(NUM_TRAIN)]
    result = InfluenceResult(scores=torch.randn(1, NUM_TRAIN, generator=torch.Generator().manual_seed(0)), step=1)
    page = write_html_report(result, tmp_path / "images.html", train_dataset=images, top_k=3).read_text()
    examples = [src for src in parse(page).images if src.startswith("data:image/png")]
    shown = re.findall(r'<img alt="image 1x8x8" src="data:image/png;base64,([^"]+)"', page)
    assert len(shown) == 6 and len(examples) > 6  # 3 top + 3 bottom, plus the plots
    assert Image.open(io.BytesIO(base64.b64decode(shown[0]))).size == (8, 8)


LAYOUT_CHECK = """<script>
window.addEventListener("load", () => {
  const tables = Array.from(document.querySelectorAll("table"));
  const wide = tables.filter(t => t.getBoundingClientRect().right > document.documentElement.clientWidth + 1);
  document.body.setAttribute("data-wide-tables", wide.length);
  document.body.setAttribute("data-page-scrolls", document.documentElement.scrollWidth > window.innerWidth);
});
</script>"""


def wide_run(num_queries=20, num_layers=12):
    """A run like a real model's: many queries, many long layer names, a tail a power law fits and
    one it does not (log-normal rows)."""
    import numpy as np

    layers = [f"transformer.blocks.{i}.attention.query_key_value" for i in range(num_layers)]
    results = []
    for step in (100, 200, 300):
        rng = np.random.default_rng(step)
        rows = [rng.lognormal(0.0, 1.0, 10000) if q % 2 else (1 - rng.random(10000)) ** (-1 / 1.5)
                for q in range(num_queries)]
        scores = torch.tensor(np.stack(rows), dtype=torch.float32) - 1.0
        layer_scores = scores[None] * torch.softmax(torch.randn(num_layers, 1, 1, generator=torch.Generator().manual_seed(step)), 0)
        results.append(InfluenceResult(scores=scores, layer_names=layers, layer_scores=layer_scores, step=step,
                                       epoch=step // 100))
    return results


@pytest.fixture(scope="module")
def wide_report(tmp_path_factory):
    results = wide_run()
    out = write_html_report(results, tmp_path_factory.mktemp("wide") / "report.html", top_k=TOP)
    return results, out, out.read_text(encoding="utf-8")


def test_every_query_is_reachable_from_an_index(wide_report):
    results, _, page = wide_report
    ids = results[-1].query_ids.tolist()
    assert len(ids) == 20
    for query_id in ids:
        assert page.count(f'id="query-{query_id}"') == 1
        assert f'href="#query-{query_id}"' in page  # the index links every query
        assert f'alt="tail/q{query_id}"' in page  # and every query has its tail plot


def test_every_number_shown_is_explained(wide_report):
    from lightning_influence.reporting.glossary import describe

    _, _, page = wide_report
    tail = page[page.index('<section id="tail">'):page.index('<section id="layers">')]
    statistics = re.findall(r'<tr><td title="([^"]*)">([^<]+)</td><td class="num">', tail)
    assert {name for _, name in statistics} >= {"tail_alpha", "tail_plausible_fraction", "tail_ks", "gini"}
    assert all(title and describe(name) for title, name in statistics), statistics
    trajectory = page[page.index('<section id="trajectory">'):page.index('<section id="comparison">')]
    rows = re.findall(r'<tr><td title="([^"]*)">([^<]+)</td>', trajectory)
    assert {name for _, name in rows} >= {"tail_alpha", f"topk_churn@{TOP}", "spearman_prev"}
    assert "topk_churn</td>" not in page  # the churn always names its k
    assert all(title for title, _ in rows), [name for title, name in rows if not title]
    assert '<dl class="glossary">' in trajectory and '<dl class="glossary">' in tail


def test_tails_are_called_power_laws_only_where_the_tests_allow(wide_report):
    _, _, page = wide_report
    tail = page[page.index('<section id="tail">'):page.index('<section id="layers">')]
    assert "heavy tail, power law not supported (lognormal favoured)" in tail
    assert "power law plausible" in tail
    assert re.search(r"plausible power law for \d+% of the queries", tail)


@pytest.mark.skipif(CHROMIUM is None, reason=SKIP_REASON)
def test_no_table_scrolls_sideways_in_chromium(wide_report, tmp_path):
    _, _, page = wide_report
    probe = tmp_path / "layout.html"
    probe.write_text(page.replace("</body>", LAYOUT_CHECK + "</body>"), encoding="utf-8")
    dom = chromium(tmp_path, "--virtual-time-budget=5000", "--window-size=1200,2000", "--dump-dom", probe.as_uri())
    attrs = parse(dom).body_attrs
    assert attrs["data-wide-tables"] == "0" and attrs["data-page-scrolls"] == "false", attrs
