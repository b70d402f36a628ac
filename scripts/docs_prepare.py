"""Stage nbdev-processed notebooks (`_proc/`) as the MkDocs source folder that `mkdocs.yml` builds.

`nbdev-proc-nbs` writes notebooks meant for Quarto: a raw YAML front-matter cell, `#| echo`,
`#| output` and `#| include` cell options, and `show_doc` cells whose Markdown output Quarto
inserts as page text. MkDocs with mkdocs-jupyter does not read Quarto options, so this script
applies them to the notebooks themselves and writes the navigation in reading order (index
first, then by file name). A widget output is replaced by a visible note, because nbdev-clean
drops widget state and the site loads no JavaScript from a CDN.

Usage: python scripts/docs_prepare.py PROC_DIR NBS_DIR OUT_DIR
"""

from __future__ import annotations

import argparse
import html
import json
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
COLAB_BADGE_URL = "https://colab.research.google.com/assets/colab-badge.svg"
LOCAL_COLAB_BADGE = "assets/images/colab-badge.svg"
WIDGET_NOTE = (
    '<div class="widget-static-note" role="note"><p><strong>Interactive widget.</strong> '
    "This output is an ipywidgets control ({name}), which needs a running Python kernel. "
    "Open the notebook in Jupyter or Colab to use it.</p></div>"
)
REMOVE_INPUT_TAG = "docs-remove-input"
# Files in `_proc` that belong to Quarto or that MkDocs would take for pages.
QUARTO_SUFFIXES = {".ipynb", ".md", ".qmd", ".yml", ".yaml"}
QUARTO_FILES = {"styles.css"}
_re_option = re.compile(r"^\s*#\|\s*([\w-]+)\s*:\s*(.*?)\s*$")
_re_widget_name = re.compile(r"^\s*([A-Za-z_]\w*)\(")
# Terminal control sequences other than colours (SGR, ending in "m"), such as the line erasing
# that tqdm and ipywidgets print. nbconvert would show them as stray characters.
_re_ansi_control = re.compile(r"\x1b\[[0-9;?]*[A-Za-ln-z]")
# nbval's cell markers: test instructions, not part of what a reader should see.
_re_nbval_marker = re.compile(r"^\s*#\s*NBVAL_[A-Z_]+\s*$")
_re_fence = re.compile(r"^\s*(```|~~~)")
_re_heading = re.compile(r"^#{1,6}\s")
_re_code_span = re.compile(r"(`+)(.+?)\1")


@dataclass
class Page:
    "One notebook of the site: where it came from, the file it becomes and its navigation title."

    source: Path  # notebook under the nbs folder, relative to it
    target: Path  # staged notebook, relative to the MkDocs docs folder
    title: str
    problems: list[str] = field(default_factory=list)


def reading_order(path: Path) -> tuple:
    "Sort key that puts `index.ipynb` first and every other notebook in file-name order."
    return (path.parts[:-1], path.stem != "index", path.name)


def split_options(source: str) -> tuple[dict, str]:
    "Split the leading `#| key: value` cell options of a code cell from its code."
    options, lines = {}, source.splitlines()
    while lines and (match := _re_option.match(lines[0])):
        options[match.group(1)] = yaml.safe_load(match.group(2)) if match.group(2) else True
        lines.pop(0)
    return options, "\n".join(lines)


def is_false(value) -> bool:
    "Tell whether a Quarto option value means false (YAML `false`, or the string 'false')."
    return value is False or str(value).lower() == "false"


def join_text(value) -> str:
    "Return notebook text, stored either as one string or as a list of lines, as one string."
    return "".join(value) if isinstance(value, list) else value


def apply_carriage_returns(text: str) -> str:
    "Keep what a terminal shows of each line: the text after its last carriage return."
    lines = text.split("\n")
    return "\n".join(line.rstrip("\r").rsplit("\r", 1)[-1] for line in lines)


def widget_note(output: dict) -> dict:
    "Return a display output that replaces a widget view with a note naming the widget class."
    fallback = join_text(output.get("data", {}).get("text/plain", ""))
    match = _re_widget_name.match(fallback)
    name = html.escape(match.group(1) if match else "widget")
    return {"output_type": "display_data", "metadata": {}, "data": {"text/html": WIDGET_NOTE.format(name=name)}}


def clean_outputs(outputs: list[dict]) -> list[dict]:
    "Replace widget views by notes and reduce progress-bar streams to their final state."
    cleaned = []
    for output in outputs:
        if WIDGET_VIEW in output.get("data", {}):
            cleaned.append(widget_note(output))
            continue
        if output.get("output_type") == "stream":
            text = apply_carriage_returns(_re_ansi_control.sub("", join_text(output["text"])))
            if not text.strip():
                continue
            output = {**output, "text": text}
        cleaned.append(output)
    return cleaned


def code_spans_in_headings(markdown: str) -> str:
    """Write backtick code spans in Markdown headings as `<code>` HTML.

    mkdocs-jupyter 0.26 deletes backtick spans before it builds the table of contents, so a
    heading such as "The main job: `medseg segment train`" got a shortened title and an anchor
    that is not on the page. HTML code keeps the text, and both anchors agree."""
    lines, in_fence = markdown.split("\n"), False
    for index, line in enumerate(lines):
        if _re_fence.match(line):
            in_fence = not in_fence
        elif not in_fence and _re_heading.match(line):
            lines[index] = _re_code_span.sub(lambda m: f"<code>{html.escape(m.group(2).strip())}</code>", line)
    return "\n".join(lines)


def local_badges(markdown: str) -> str:
    "Point the Open-in-Colab badge image at the copy shipped with the site, which loads nothing from the network."
    return markdown.replace(COLAB_BADGE_URL, LOCAL_COLAB_BADGE)


def anchor_repeated_headings(cells: list[dict]) -> list[dict]:
    """Add the anchor that the table of contents expects before each repeated heading.

    When two headings of a page have the same text (a section called `load_promptable_model` and
    the `show_doc` entry of that function), Python-Markdown's table of contents links the second
    one as `#slug_1`, but the heading that nbconvert renders keeps the plain `slug` id. An empty
    anchor with the expected id makes that link land on the heading."""
    from markdown.extensions.toc import slugify

    seen: dict[str, int] = {}
    anchored = []
    for cell in cells:
        if cell["cell_type"] != "markdown":
            anchored.append(cell)
            continue
        lines, in_fence = join_text(cell["source"]).split("\n"), False
        for index, line in enumerate(lines):
            if _re_fence.match(line):
                in_fence = not in_fence
            elif not in_fence and _re_heading.match(line):
                text = re.sub(r"<[^>]+>", "", line.lstrip("#")).strip()
                slug = slugify(html.unescape(text), "-")
                if slug in seen:
                    seen[slug] += 1
                    lines[index] = f'<a id="{slug}_{seen[slug]}"></a>\n\n{line}'
                else:
                    seen[slug] = 0
        anchored.append({**cell, "source": "\n".join(lines)})
    return anchored


def markdown_cell(source: str) -> dict:
    return {"cell_type": "markdown", "metadata": {}, "source": source}


def renumber(cells: list[dict]) -> list[dict]:
    "Give every cell a fresh id and drop cell metadata other than tags (nbdev adds timings)."
    numbered = []
    for index, cell in enumerate(cells):
        metadata = {"tags": cell["metadata"]["tags"]} if cell.get("metadata", {}).get("tags") else {}
        numbered.append({**cell, "id": f"cell-{index}", "metadata": metadata})
    return numbered


def front_matter(cell: dict) -> dict | None:
    "Return the YAML front matter that nbdev writes as a raw first cell, or None."
    if cell["cell_type"] != "raw":
        return None
    text = join_text(cell["source"]).strip()
    if not text.startswith("---"):
        return None
    return yaml.safe_load(text.strip("-\n")) or {}


def convert_cells(cells: list[dict]) -> list[dict]:
    "Apply the Quarto cell options that nbdev writes and return the cells a page shows."
    converted = []
    for cell in cells:
        if cell["cell_type"] == "markdown":
            converted.append({**cell, "source": local_badges(code_spans_in_headings(join_text(cell["source"])))})
            continue
        if cell["cell_type"] != "code":
            converted.append(cell)
            continue

        options, code = split_options(join_text(cell["source"]))
        code = "\n".join(line for line in code.split("\n") if not _re_nbval_marker.match(line))
        if is_false(options.get("include", True)):
            continue
        cell = {**cell, "source": code, "outputs": clean_outputs(cell.get("outputs", []))}
        if is_false(options.get("output", True)):
            cell["outputs"] = []

        # `output: asis` (nbdev adds it to show_doc cells) means the Markdown output is page text.
        if options.get("output") == "asis":
            for output in cell["outputs"]:
                markdown = output.get("data", {}).get("text/markdown")
                if markdown is not None:
                    converted.append(markdown_cell(code_spans_in_headings(join_text(markdown))))
            cell["outputs"] = [o for o in cell["outputs"] if "text/markdown" not in o.get("data", {})]
            if not cell["outputs"]:
                continue

        if is_false(options.get("echo", True)):
            tags = cell.get("metadata", {}).get("tags", [])
            cell["metadata"] = {**cell.get("metadata", {}), "tags": [*tags, REMOVE_INPUT_TAG]}
        converted.append(cell)
    return converted


def summary_problems(source_nb: dict, name: str) -> list[str]:
    "List style problems in the title cell that nbdev's front matter would silently lose."
    cells = source_nb.get("cells", [])
    first = join_text(cells[0]["source"]) if cells and cells[0]["cell_type"] == "markdown" else ""
    problems = []
    if not first.lstrip().startswith("# "):
        problems.append(f"{name}: the first cell must be a Markdown cell that starts with an H1 title ('# Title').")
    quoted = [line for line in first.splitlines() if line.startswith(">")]
    if len(quoted) > 1:
        problems.append(
            f"{name}: the summary blockquote spans {len(quoted)} lines, and nbdev keeps only the "
            "first as the page description; write the summary on one line."
        )
    return problems


def stage_notebook(proc_path: Path, source_nb: dict, relative: Path) -> tuple[dict, Page]:
    "Convert one processed notebook into the notebook MkDocs renders, and describe its page."
    nb = json.loads(proc_path.read_text(encoding="utf-8"))
    cells = nb["cells"]
    meta = front_matter(cells[0]) if cells else None
    if meta is not None:
        cells = cells[1:]
    meta = meta or {}

    title = str(meta.get("title") or relative.stem)
    heading = f"# {title}"
    if meta.get("description"):
        heading += f"\n\n> {meta['description']}"
    nb["cells"] = renumber(anchor_repeated_headings([markdown_cell(heading), *convert_cells(cells)]))

    # nbdev records the widget state of its own doc-processing kernel. With that metadata present,
    # mkdocs-jupyter loads the widget manager from a CDN, so it is removed (widget views become notes).
    nb["metadata"].pop("widgets", None)

    output_file = meta.get("output-file") or f"{relative.stem}.html"
    target = relative.parent / Path(output_file).with_suffix(".ipynb")
    page = Page(source=relative, target=target, title=title, problems=summary_problems(source_nb, str(relative)))
    return nb, page


def find_notebooks(proc_dir: Path, nbs_dir: Path) -> list[Path]:
    "List processed notebooks whose source still exists, in reading order, relative to `proc_dir`."
    found = []
    for path in proc_dir.rglob("*.ipynb"):
        relative = path.relative_to(proc_dir)
        if any(part.startswith((".", "_")) for part in relative.parts):
            continue
        if (nbs_dir / relative).exists():  # `_proc` keeps notebooks that were deleted from nbs/
            found.append(relative)
    return sorted(found, key=reading_order)


def copy_other_files(proc_dir: Path, docs_dir: Path) -> None:
    "Copy files that notebooks link to (images, data) from `proc_dir`, but not Quarto's own files."
    for path in proc_dir.rglob("*"):
        relative = path.relative_to(proc_dir)
        if path.is_dir() or any(part.startswith((".", "_")) for part in relative.parts):
            continue
        if path.suffix in QUARTO_SUFFIXES or path.name in QUARTO_FILES:
            continue
        (docs_dir / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, docs_dir / relative)


def nav_entries(pages: list[Page]) -> list[dict]:
    "Build the MkDocs `nav` list: the home page, then every other page in reading order."
    return [{("Home" if page.target.as_posix() == "index.ipynb" else page.title): page.target.as_posix()}
            for page in pages]


def stage_site(proc_dir: Path, nbs_dir: Path, out_dir: Path, assets: dict[Path, Path]) -> list[Page]:
    "Write staged notebooks, assets and `nav.yml` into `out_dir`; return the pages in nav order."
    docs_dir = out_dir / "pages"
    if out_dir.exists():
        shutil.rmtree(out_dir)
    docs_dir.mkdir(parents=True)

    pages, targets = [], {}
    for relative in find_notebooks(proc_dir, nbs_dir):
        source_nb = json.loads((nbs_dir / relative).read_text(encoding="utf-8"))
        nb, page = stage_notebook(proc_dir / relative, source_nb, relative)
        if page.target in targets:
            raise SystemExit(
                f"docs_prepare: {relative} and {targets[page.target]} both become {page.target.with_suffix('.html')}; "
                "give one of them another `#| default_exp` module name or file name."
            )
        targets[page.target] = relative
        destination = docs_dir / page.target
        destination.parent.mkdir(parents=True, exist_ok=True)
        destination.write_text(json.dumps(nb, ensure_ascii=False), encoding="utf-8")
        pages.append(page)

    if not pages or pages[0].target.as_posix() != "index.ipynb":
        raise SystemExit(f"docs_prepare: no index.ipynb among the processed notebooks in {proc_dir}; it is the home page.")

    copy_other_files(proc_dir, docs_dir)
    for source, target in assets.items():
        if not source.exists():
            raise SystemExit(f"docs_prepare: missing asset {source}; run `npm ci --prefix docs_assets` first.")
        copy_to = docs_dir / target
        copy_to.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, copy_to)
        else:
            shutil.copy2(source, copy_to)

    manifest = [{"source": page.source.as_posix(), "url": page.target.with_suffix(".html").as_posix(),
                 "title": page.title, "problems": page.problems} for page in pages]
    (out_dir / "pages.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False))
    (out_dir / "nav.yml").write_text(yaml.safe_dump({"nav": nav_entries(pages)}, sort_keys=False, allow_unicode=True))
    return pages


def site_assets(root: Path) -> dict[Path, Path]:
    "Map committed and npm-installed asset files to their place in the MkDocs docs folder."
    mathjax = root / "docs_assets/node_modules/mathjax/es5"
    return {
        root / "docs_assets/javascripts": Path("assets/javascripts"),
        root / "docs_assets/stylesheets": Path("assets/stylesheets"),
        root / "docs_assets/images": Path("assets/images"),
        mathjax / "tex-chtml-full.js": Path("assets/mathjax/tex-chtml-full.js"),
        mathjax / "output/chtml/fonts/woff-v2": Path("assets/mathjax/output/chtml/fonts/woff-v2"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("proc_dir", type=Path, help="folder that nbdev-proc-nbs wrote (usually _proc)")
    parser.add_argument("nbs_dir", type=Path, help="the notebook folder (nbs)")
    parser.add_argument("out_dir", type=Path, help="folder to create; mkdocs.yml reads OUT_DIR/pages and OUT_DIR/nav.yml")
    args = parser.parse_args(argv)

    root = Path(__file__).resolve().parent.parent
    pages = stage_site(args.proc_dir, args.nbs_dir, args.out_dir, site_assets(root))
    for problem in (problem for page in pages for problem in page.problems):
        print(f"docs_prepare: warning: {problem}", file=sys.stderr)
    print(f"docs_prepare: staged {len(pages)} pages in {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
