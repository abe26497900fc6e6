"""The full-screen view of `loopwatch top`, on textual (the `top` extra). The data and the words are `top.py`'s."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text
from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.widgets import DataTable, Footer, Input, Static

from .top import (
    COLUMNS,
    SORTS,
    Poller,
    Server,
    detail_lines,
    matches,
    row,
    sort_servers,
    stuck_lines,
    write_server_profile,
)

STUCK = "bold white on dark_red"


class TopApp(App[None]):
    TITLE = "loopwatch top"
    CSS = """
    #stuck { background: $error 30%; color: $text; padding: 0 1; height: auto; max-height: 50%; display: none; }
    #servers { height: auto; max-height: 40%; }
    #detail { border-top: solid $primary; }
    #filter { display: none; dock: bottom; }
    #status { height: 1; color: $text-muted; }
    """
    BINDINGS = [
        Binding("q", "quit", "Quit"),
        Binding("s", "sort", "Sort"),
        Binding("slash", "filter", "Filter"),
        Binding("escape", "clear_filter", "Clear filter", show=False),
        Binding("w", "write_profile", "Write profile"),
    ]

    def __init__(self, poller: Poller, interval: float = 0.5) -> None:
        super().__init__()
        self.poller = poller
        self.interval = interval
        self.sort_by = SORTS[0]
        self.filter_text = ""
        self.selected: Path | None = None
        self.follow_top = True
        """Until the user moves the cursor, the detail follows the first row (a stuck server, when there is one)."""
        self.servers: list[Server] = []

    def compose(self) -> ComposeResult:
        yield Static(id="status")
        yield Static(id="stuck")
        yield DataTable(id="servers", cursor_type="row", zebra_stripes=True)
        with VerticalScroll(id="detail"):
            yield Static(id="detail-body")
        yield Input(placeholder="filter: part of a name, pid or command (Enter keeps it, Esc clears)", id="filter")
        yield Footer()

    def on_mount(self) -> None:
        self.refresh_servers()
        self.set_interval(self.interval, self.refresh_servers)

    def on_unmount(self) -> None:
        self.poller.close()

    @work(thread=True, exclusive=True, group="poll")
    def refresh_servers(self) -> None:
        """On a worker thread: a server that does not answer delays this look by the timeout, never the UI."""
        servers = self.poller.poll(detail=self.selected)
        self.call_from_thread(self.show, servers)

    # -- drawing -----------------------------------------------------------------------------------
    def show(self, servers: list[Server]) -> None:
        self.servers = servers
        shown = [s for s in sort_servers(servers, self.sort_by) if matches(s, self.filter_text)]
        self._show_status(shown)
        self._show_stuck([s for s in shown if s.stuck])
        self._show_table(shown)
        self._show_detail()

    def _show_status(self, shown: list[Server]) -> None:
        stuck = sum(s.stuck for s in shown)
        parts = [f"{len(shown)} server{'s' if len(shown) != 1 else ''}", f"{stuck} stuck", f"sort: {self.sort_by}"]
        if self.filter_text:
            parts.append(f"filter: {self.filter_text!r}")
        if self.poller.cleaned:
            parts.append(self.poller.cleaned[-1])
        self.query_one("#status", Static).update("  ·  ".join(parts))

    def _show_stuck(self, stuck: list[Server]) -> None:
        panel = self.query_one("#stuck", Static)
        panel.display = bool(stuck)
        text = Text()
        for index, server in enumerate(stuck):
            lines = stuck_lines(server)
            text.append(("\n" if index else "") + lines[0] + "\n", style=STUCK)
            text.append("\n".join(lines[1:]), style="bold red")
        panel.update(text)

    def _show_table(self, shown: list[Server]) -> None:
        table = self.query_one("#servers", DataTable)
        keep = self.selected
        table.clear(columns=True)  # widths follow the content (a state grows from "ok" to "BLOCKED")
        table.add_columns(*COLUMNS)
        for server in shown:
            cells: list[Any] = row(server)
            if server.stuck:
                cells = [Text(c, style="bold red") for c in cells]
            table.add_row(*cells, key=str(server.path))
        paths = [s.path for s in shown]
        if self.follow_top and paths:
            keep = self.selected = paths[0]
        if keep in paths:
            table.move_cursor(row=paths.index(keep), animate=False)
        elif paths:
            self.selected = paths[0]

    def _show_detail(self) -> None:
        body = self.query_one("#detail-body", Static)
        server = next((s for s in self.servers if s.path == self.selected), None)
        if server is None or server.state is None:
            body.update("no server selected" if server is None else f"{server.path}: no answer yet")
            return
        parts = detail_lines(server)
        tools = Table(*parts["tool_rows"][0], box=None, header_style="bold", pad_edge=False)
        for cells in parts["tool_rows"][1:]:
            tools.add_row(*cells)
        body.update(Group(
            Text("\n".join(parts["head"]), style="bold red" if server.stuck else "bold"),
            Text("\ntools", style="bold underline"),
            tools if len(parts["tool_rows"]) > 1 else Text("no tool calls yet"),
            Text("\nrecent blocks (newest first)", style="bold underline"),
            Text("\n".join(parts["blocks"])),
            Text("\nloop thread stack now (innermost last; -> the application line)", style="bold underline"),
            Text("\n".join(parts["stack"])),
        ))

    # -- keys --------------------------------------------------------------------------------------
    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        if event.row_key.value is not None:
            path = Path(event.row_key.value)
            if path != self.selected:
                self.selected = path
                self._show_detail()
                self.refresh_servers()  # its detail (stack, recent blocks) now, not at the next tick

    def on_key(self, event: Any) -> None:
        if event.key in ("up", "down", "pageup", "pagedown", "home", "end", "enter"):
            self.follow_top = False  # the user picks the server from now on

    def action_sort(self) -> None:
        self.sort_by = SORTS[(SORTS.index(self.sort_by) + 1) % len(SORTS)]
        self.show(self.servers)

    def action_filter(self) -> None:
        field = self.query_one("#filter", Input)
        field.display = True
        field.focus()

    def action_clear_filter(self) -> None:
        field = self.query_one("#filter", Input)
        field.value, field.display, self.filter_text = "", False, ""
        self.query_one("#servers", DataTable).focus()
        self.show(self.servers)

    def on_input_changed(self, event: Input.Changed) -> None:
        self.filter_text = event.value.strip()
        self.show(self.servers)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.input.display = False
        self.query_one("#servers", DataTable).focus()

    def action_write_profile(self) -> None:
        server = next((s for s in self.servers if s.path == self.selected), None)
        if server is None:
            self.notify("no server selected", severity="warning")
            return
        self._write_profile(server)

    @work(thread=True, group="profile")
    def _write_profile(self, server: Server) -> None:
        try:
            written = write_server_profile(server)
        except Exception as exc:
            self.call_from_thread(self.notify, f"{server.name}: {exc}", severity="error")
            return
        self.call_from_thread(self.notify, "\n".join(written), title=f"{server.name}: blocked time written")
