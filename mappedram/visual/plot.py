"""Pictures of a snapshot (layout and population) and of a diff, drawn with matplotlib.

matplotlib is an optional extra (``pip install 'mappedram[plot]'``); it is imported
only here, when a picture is asked for. What is drawn comes from ``layout.py``.
"""

from __future__ import annotations

import io
import os
import warnings
from typing import TYPE_CHECKING, Any, Callable, Sequence, TypeVar

import numpy as np

from ..mapper.snapshot import Snapshot
from ..progress import human
from ..textsafe import printable
from .diff import DiffResult
from .layout import KINDS, Cells, Segment, cell_grid, cells_from_pages, layout, population
from .output import write_output

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

INSTALL_HINT = "pictures need matplotlib: pip install 'mappedram[plot]' (or pip install 'matplotlib>=3.7')"
FORMATS = {".png": "png", ".svg": "svg"}
COLORS = {
    "libvirt": "#7b3294",
    "prefix": "#bababa",
    "stream": "#253494",
    "block-header": "#f16913",
    "bitmap": "#d7301f",
    "padding": "#e6e6e6",
    "pages": "#41ab5d",
    "records": "#74c476",
    "devices": "#4292c6",
    "vmdesc": "#8c510a",
    "gap": "#fde68a",  # bytes no structure explains: worth seeing
}
EMPTY_CELL = "#d9d9d9"  # a cell with no page set
GAMMA = 0.4
LABEL_CHARS = 80  # of a name from the file in a label; the rest is cut
# What one figure draws, whatever the file holds (3,000 blocks would be 3,000 maps and
# 12,000 rows: minutes and gigabytes in matplotlib): the largest, named in file order.
MAX_MAPS = 24  # population or diff maps
MAX_ROWS = 48  # rows of the per-part chart
MAX_NAMED = 20  # names listed in a caption


def _text(text: str) -> str:
    """A label from file text: escaped (no control character reaches matplotlib or the SVG)
    and cut to LABEL_CHARS."""
    safe = printable(text)
    return safe if len(safe) <= LABEL_CHARS else safe[: LABEL_CHARS - 3] + "..."


class MissingMatplotlib(ImportError):
    """matplotlib is not installed: the message says what to install."""


def require_matplotlib() -> None:
    """Raise MissingMatplotlib, saying what to install, when matplotlib is missing."""
    _figure_class()


def _figure_class() -> type[Figure]:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise MissingMatplotlib(INSTALL_HINT) from None
    return Figure


def image_format(path: str | os.PathLike[str]) -> str:
    """png or svg, from the file name; ValueError for anything else."""
    suffix = os.path.splitext(os.fspath(path))[1].lower()
    if suffix not in FORMATS:
        raise ValueError(f"{os.fspath(path)}: the picture's name must end in .png or .svg, not {suffix or 'nothing'!r}")
    return FORMATS[suffix]


def render(fig: Figure, fmt: str) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():  # missing glyphs, a layout that does not fit: not the user's business
        warnings.simplefilter("ignore")
        fig.savefig(buf, format=fmt, dpi=110, metadata={"Software": None} if fmt == "png" else {"Date": None})
    return buf.getvalue()


def save(fig: Figure, path: str | os.PathLike[str], *, overwrite: bool = True, source_fds: Sequence[int] = ()) -> None:
    """The picture as ``path`` (.png or .svg); ``source_fds``: the snapshot(s) it shows."""
    write_output(path, render(fig, image_format(path)), overwrite=overwrite, source_fds=source_fds)


def _size_ticks(limit: int) -> tuple[list[int], list[str]]:
    ticks = [1 << (10 * i) for i in range(6) if 1 << (10 * i) <= limit * 2]
    return ticks, [human(t).replace(".0 ", " ") for t in ticks]


T = TypeVar("T")


def largest(items: Sequence[T], size: Callable[[T], int], limit: int) -> tuple[list[T], list[T]]:
    """(the ``limit`` largest items, the others), each in the order given."""
    if len(items) <= limit:
        return list(items), []
    keep = set(sorted(range(len(items)), key=lambda i: -size(items[i]))[:limit])
    return [x for i, x in enumerate(items) if i in keep], [x for i, x in enumerate(items) if i not in keep]


def _names(names: Sequence[str]) -> str:
    more = f", ... {len(names) - MAX_NAMED} more" if len(names) > MAX_NAMED else ""
    return ", ".join(_text(n) for n in names[:MAX_NAMED]) + more


def _draw_strip(ax: Axes, segments: Sequence[Segment], size: int) -> None:
    """The file along its length, to scale: big regions are visible, headers are not."""
    for kind in COLORS:  # one collection per kind, however many segments
        bars = [(seg.start, seg.size) for seg in segments if seg.kind == kind]
        if bars:
            ax.broken_barh(bars, (0, 1), facecolor=COLORS[kind], edgecolor="none")
    for seg in segments:
        if seg.size > size * 0.06:
            ax.text(seg.start + seg.size / 2, 0.5, _text(seg.label), ha="center", va="center", fontsize=7, clip_on=True)
    ax.set_xlim(0, size)
    ax.set_ylim(0, 1)
    ax.set_yticks([])
    ticks = np.linspace(0, size, 9)
    ax.set_xticks(ticks, [f"{human(t)}" if t else "0" for t in ticks], fontsize=7)
    ax.set_title(f"file layout to scale ({human(size)}, {size} bytes)", fontsize=9, loc="left")


def _draw_rows(ax: Axes, segments: Sequence[Segment], left_out: Sequence[Segment], size: int) -> None:
    """One row per segment in file order, its size on a log axis: 1 byte and 1 TiB both show.
    ``left_out``: the smaller segments not drawn, counted in a last row."""
    y = np.arange(len(segments))
    sizes = np.array([max(s.size, 1) for s in segments], dtype=float)
    ax.barh(y, sizes, left=0.8, color=[COLORS[s.kind] for s in segments], edgecolor="#555555", linewidth=0.3)
    ax.set_xscale("log")
    ticks, labels = _size_ticks(size)
    ax.set_xlim(0.8, max(size, 2) * 30)
    ax.set_xticks(ticks, labels, fontsize=7)
    names = [f"{s.start:#x}  {_text(s.label)}" for s in segments]
    if left_out:
        names.append(f"... {len(left_out)} smaller parts not drawn, {human(sum(s.size for s in left_out))} in all")
    ax.set_yticks(np.arange(len(names)), names, fontsize=6.5, family="monospace")
    ax.set_ylim(len(names) - 0.5, -0.5)
    for yi, seg in zip(y, segments):
        ax.text(max(seg.size, 1) * 1.15, yi, human(seg.size), va="center", fontsize=6)
    ax.grid(axis="x", color="#dddddd", linewidth=0.5)
    ax.set_axisbelow(True)
    ax.set_title("every part of the file, size on a log scale", fontsize=9, loc="left")


def _scale(cmap: str) -> tuple[Any, Any]:
    """(colour map, norm): a power scale lifts shares of a few percent off the bottom."""
    from matplotlib import colormaps
    from matplotlib.colors import PowerNorm

    return colormaps[cmap], PowerNorm(GAMMA, vmin=0.0, vmax=1.0, clip=True)


def _draw_cells(ax: Axes, cells: Cells, title: str, cmap: str) -> None:
    """The cells as layout.cell_grid lays them out: an empty cell grey, a cell with any page
    set in the colour of its share (the bottom colour however small), white past the end."""
    from matplotlib.colors import to_rgba

    colormap, norm = _scale(cmap)
    grid = cell_grid(cells)
    rgba = colormap(norm(np.clip(np.nan_to_num(grid, nan=0.0), 0.0, 1.0)))
    rgba[grid < 0] = to_rgba(EMPTY_CELL)
    rgba[np.isnan(grid)] = to_rgba("#ffffff")
    ax.imshow(rgba, aspect="auto", interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    per = cells.pages_per_cell
    unit = "1 page" if per == 1 else f"{per} pages"
    ax.set_title(f"{title}   (1 cell = {unit}, {human(per * cells.page_size)})", fontsize=7.5, loc="left")


def _colorbar(fig: Figure, axes: list[Axes], cmap: str, label: str, shrink: float) -> None:
    from matplotlib.cm import ScalarMappable

    colormap, norm = _scale(cmap)
    bar = fig.colorbar(ScalarMappable(norm=norm, cmap=colormap), ax=axes, shrink=shrink, label=label)
    bar.set_ticks([0.01, 0.1, 0.25, 0.5, 0.75, 1.0])


def _grid_heights(all_cells: Sequence[Cells]) -> list[float]:
    return [1.3 + cell_grid(c).shape[0] / 10 for c in all_cells]


def snapshot_figure(snap: Snapshot) -> Figure:
    """The layout (to scale and per part on a log scale) and each block's population map."""
    figure_class = _figure_class()
    segments = layout(snap)
    rows, rows_left_out = largest(segments, lambda s: s.size, MAX_ROWS - 1)
    size = snap.size
    blocks, blocks_left_out = largest([b for b in snap.blocks.values() if b.in_file], lambda b: b.used_length, MAX_MAPS)
    all_cells = [population(b) for b in blocks]
    row_height = 0.17 * (len(rows) + 1) + 1.2
    heights = _grid_heights(all_cells)
    fig = figure_class(figsize=(15, 1.6 + max(row_height, 0.45 * sum(heights))), layout="constrained")
    outer = fig.add_gridspec(2, 2, height_ratios=[1, max(row_height, 0.45 * sum(heights)) / 1.2], width_ratios=[1.1, 1])
    _draw_strip(fig.add_subplot(outer[0, :]), segments, size)
    _draw_rows(fig.add_subplot(outer[1, 0]), rows, rows_left_out, size)
    right = outer[1, 1].subgridspec(max(len(all_cells), 1), 1, height_ratios=heights or [1])
    for i, (block, cells) in enumerate(zip(blocks, all_cells)):
        title = f"{_text(block.name)}: {cells.total}/{block.num_pages} pages present ({human(block.used_length)})"
        _draw_cells(fig.add_subplot(right[i, 0]), cells, title, "viridis")
    if all_cells:
        _colorbar(fig, fig.axes[2:], "viridis", "share of the cell's pages present (grey: none)", 0.5)
    handles = [_patch(COLORS[k], label) for k, label in KINDS.items() if any(s.kind == k for s in segments)]
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 6), fontsize=8, frameon=False)
    title = f"{_text(os.path.basename(snap.path))}: {snap.format}, {len(snap.blocks)} RAM blocks"
    if blocks_left_out:
        title += f"\nthe {len(blocks)} largest blocks drawn; {len(blocks_left_out)} smaller blocks not drawn"
    fig.suptitle(title, fontsize=10)
    return fig


def _patch(color: str, label: str) -> object:
    from matplotlib.patches import Patch

    return Patch(facecolor=color, edgecolor="#555555", linewidth=0.4, label=label)


def diff_figure(result: DiffResult) -> Figure:
    """Per block that differs, the share of each cell's pages whose contents differ; the
    identical blocks and the device sections that differ are named in the caption."""
    figure_class = _figure_class()
    differing = [d for d in result.blocks.values() if d.count]
    diffs, undrawn = largest(differing, lambda d: d.count, MAX_MAPS)
    same = [d.name for d in result.blocks.values() if not d.count]
    all_cells = [cells_from_pages(d.name, d.pages, d.num_pages, d.page_size) for d in diffs]
    heights = _grid_heights(all_cells)
    fig = figure_class(figsize=(10, 1.6 + 0.45 * sum(heights)), layout="constrained")
    if diffs:
        grid = fig.add_gridspec(len(diffs), 1, height_ratios=heights)
        for i, (d, cells) in enumerate(zip(diffs, all_cells)):
            title = (
                f"{_text(d.name)}: {d.count}/{d.num_pages} pages differ ({len(d.changed)} changed, "
                f"{len(d.only_a)} only in A, {len(d.only_b)} only in B)"
            )
            _draw_cells(fig.add_subplot(grid[i, 0]), cells, title, "Reds")
        _colorbar(fig, fig.axes, "Reds", "share of the cell's pages that differ (grey: none)", 0.9)
    verdict = "identical" if result.identical else f"{sum(d.count for d in differing)} pages differ"
    a, b = (_text(os.path.basename(p)) for p in (result.a, result.b))
    fig.suptitle(f"A = {a}, B = {b}: {verdict}", fontsize=10)
    notes = []
    if undrawn:
        names = _names([d.name for d in undrawn])
        notes.append(f"{len(undrawn)} more blocks differ in fewer pages, not drawn: {names}")
    if same:
        notes.append(f"identical blocks: {_names(same)}")
    if result.devices:
        notes.append(f"device state differs: {_names([d.idstr for d in result.devices])}")
    if notes:
        fig.supxlabel("\n".join(_wrap(n) for n in notes), fontsize=8, ha="left", x=0.01)
    return fig


def _wrap(text: str, width: int = 150) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width))
