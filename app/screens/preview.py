"""The preview screen: pick a target and watch the plan update; the plan shown is the one Convert runs."""

from __future__ import annotations

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.widgets import Checkbox, Footer, Header, Input, Label, RadioButton, RadioSet, Select, Static
from textual.worker import Worker, get_current_worker

from engine import Checkpoint, CheckpointError, PlanError
from engine.plan import Plan, Target, plan_conversion

from ..formatting import rel_path
from ..messages import PlanFailed, PlanReady
from ..targets import DEFAULT_MAX_SHARD, default_destination, make_target
from ..widgets.plan_view import PlanView
from .base import ExplorerScreen
from .error_modal import one_line_cause

KINDS = ("universal", "safetensors", "torch", "reshard")
KIND_LABELS = {
    "universal": "DeepSpeed universal",
    "safetensors": "safetensors (HF)",
    "torch": "torch .bin (HF)",
    "reshard": "reshard tp / pp",
}
# "as saved": consolidated outputs take the fp32 master weights, a reshard keeps the model dtype
DTYPE_OPTIONS = [("as saved", "saved"), ("float32", "float32"), ("bfloat16", "bfloat16"), ("float16", "float16")]
QUANT_OPTIONS = [("none", "none"), ("int8 (grouped)", "int8")]
# which form fields apply to which target kind
FIELDS = {
    "universal": {"strict"},
    "safetensors": {"dtype", "max-shard", "strict"},
    "torch": {"dtype", "max-shard", "strict"},
    "reshard": {"tp", "pp", "quantize", "groups", "strict"},
}


class PreviewScreen(ExplorerScreen):
    """Target form on the left, the live plan on the right."""

    BINDINGS = [
        Binding("c", "convert", "Convert…", tooltip="Run this plan (asks for a destination)", id="preview.convert"),
        Binding("f", "toggle_flagged", "Flagged only", tooltip="Show only flagged items", id="preview.flagged"),
        Binding("escape", "back", "Back", tooltip="Back to the browser", id="preview.back"),
    ]

    def __init__(self, checkpoint: Checkpoint, root: str) -> None:
        super().__init__()
        self.checkpoint = checkpoint
        self.root = root
        self.plan: Plan | None = None
        self.target: Target | None = None
        self.kind = "universal"

    def compose(self) -> ComposeResult:
        deg = self.checkpoint.degrees
        yield Header(icon="◆")
        with Horizontal(id="preview"):
            with VerticalScroll(id="target-form"):
                yield Label("Target", classes="form-label")
                with RadioSet(id="target-kind"):
                    for kind in KINDS:
                        yield RadioButton(KIND_LABELS[kind], value=kind == self.kind, name=kind)
                yield Label("dtype", classes="form-label", id="label-dtype")
                yield Select(DTYPE_OPTIONS, value="saved", allow_blank=False, id="field-dtype", compact=True)
                yield Label("tp × pp", classes="form-label", id="label-tp")
                with Horizontal(id="degrees-row"):
                    yield Input(str(deg.tp), type="integer", id="field-tp", compact=True)
                    yield Input(str(deg.pp), type="integer", id="field-pp", compact=True)
                yield Label("quantize · groups", classes="form-label", id="label-quantize")
                with Horizontal(id="quant-row"):
                    yield Select(QUANT_OPTIONS, value="none", allow_blank=False, id="field-quantize", compact=True)
                    yield Input("64", type="integer", id="field-groups", compact=True)
                yield Label("max shard size", classes="form-label", id="label-max-shard")
                yield Input(DEFAULT_MAX_SHARD, id="field-max-shard", compact=True)
                yield Checkbox("strict: refuse flagged", id="field-strict", compact=True)
                yield Static("Tab   next field\nEnter convert…\nEsc   back to the browser", id="form-hint")
            yield PlanView(self.root, id="plan-view")
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = f"preview · {rel_path(self.checkpoint.path, self.root)}"
        self.query_one("#target-kind", RadioSet).focus()
        self._apply_kind()
        self.replan()

    # --- the form ------------------------------------------------------------------------------------------------

    def _apply_kind(self) -> None:
        wanted = FIELDS[self.kind]
        for field in ("dtype", "tp", "pp", "quantize", "groups", "max-shard", "strict"):
            self.query_one(f"#field-{field}").disabled = field not in wanted

    def read_target(self) -> Target:
        quantize = self.query_one("#field-quantize", Select).value
        dtype = self.query_one("#field-dtype", Select).value
        return make_target(
            self.kind,
            dtype=None if dtype == "saved" else str(dtype),
            tp=self.query_one("#field-tp", Input).value,
            pp=self.query_one("#field-pp", Input).value,
            quantize=None if quantize == "none" else str(quantize),
            groups=self.query_one("#field-groups", Input).value,
            max_shard_size=self.query_one("#field-max-shard", Input).value,
            strict=self.query_one("#field-strict", Checkbox).value,
        )

    @on(RadioSet.Changed, "#target-kind")
    def _kind_changed(self, event: RadioSet.Changed) -> None:
        self.kind = event.pressed.name or "universal"
        self._apply_kind()
        self.replan()

    @on(Input.Submitted)
    def _field_submitted(self) -> None:
        """Enter in a field means "go": the keyboard path to Convert that does not leave the form."""
        self.action_convert()

    @on(Input.Changed)
    @on(Select.Changed)
    @on(Checkbox.Changed)
    def _field_changed(self) -> None:
        self.replan()

    # --- planning ------------------------------------------------------------------------------------------------

    def replan(self) -> None:
        try:
            target = self.read_target()
        except ValueError as exc:
            self.post_message(PlanFailed(str(exc)))
            return
        if target == self.target and self.plan is not None:
            return
        self.target = target
        self.query_one(PlanView).show_pending()
        self.compute_plan(target)

    @work(thread=True, exclusive=True, group="plan", exit_on_error=False, description="Planning")
    def compute_plan(self, target: Target) -> None:
        try:
            plan = plan_conversion(self.checkpoint, target)
        except (PlanError, CheckpointError) as exc:
            if not get_current_worker().is_cancelled:
                self.post_message(PlanFailed(str(exc)))
            return
        if not get_current_worker().is_cancelled:
            self.post_message(PlanReady(plan))

    @on(PlanReady)
    def _plan_ready(self, message: PlanReady) -> None:
        if message.plan.target != self.target:
            return  # a stale plan from before the last edit
        self.plan = message.plan
        destination = self.destination()
        self.query_one(PlanView).show_plan(message.plan, destination, self.app.free_disk(destination))  # type: ignore[attr-defined]

    @on(PlanFailed)
    def _plan_failed(self, message: PlanFailed) -> None:
        self.plan = None
        self.query_one(PlanView).show_failure(message.cause)

    def worker_failed(self, worker: Worker) -> None:
        if worker.group == "plan" and worker.error is not None:
            self.plan = None
            self.query_one(PlanView).show_failure(one_line_cause(worker.error))

    def destination(self) -> str:
        target = self.target or Target(self.kind)
        return default_destination(self.checkpoint, target)

    # --- actions -------------------------------------------------------------------------------------------------

    def action_convert(self) -> None:
        if self.plan is None:
            self.notify("No plan to run: fix the target first.", severity="warning")
            return
        try:
            current = self.read_target()
        except ValueError:
            current = None
        if current != self.plan.target:
            self.notify("Still planning the latest change; try again in a moment.", severity="warning")
            return
        self.app.confirm_conversion(self.plan, self.destination())  # type: ignore[attr-defined]

    def action_toggle_flagged(self) -> None:
        self.query_one(PlanView).toggle_flagged()

    def action_back(self) -> None:
        self.dismiss()
