"""What a job may read, checked at submit: every location in the spec canonicalised and checked
by the one read policy (``workers/uri_policy.py``), the dataset looked at where that is cheap
(missing, empty, one class for fine-tuning, an unreadable shard index), and a ``job:`` source
that must be the tenant's own succeeded pretrain job. Each refusal is an ``InvalidSpec`` naming
the field; a store that cannot be reached is ``Unavailable``."""

from __future__ import annotations

from service.server.adapters.store import JobStore
from service.server.config import Settings
from service.server.domain.errors import InvalidSpec, Unavailable
from service.states import JobState
from workers.sources import submit_problems
from workers.spec import JobSpec
from workers.uri_policy import LocationRefused


def check_locations(settings: Settings, store: JobStore, tenant: str, spec: JobSpec) -> None:
    checks = [("data.uri", spec.data.uri)]
    ft = spec.finetune
    if ft is not None and ft.init_from and ft.init_from != "scratch":
        if ft.init_from.startswith("job:"):
            check_source_job(store, tenant, ft.init_from.removeprefix("job:").strip())
        else:
            checks.append(("finetune.init_from", ft.init_from))
    for loc, uri in checks:
        try:
            where = settings.read_policy.check(uri, loc)
        except LocationRefused as e:
            reason = str(e).removeprefix(f"{loc}: ")
            raise InvalidSpec(str(e), [{"loc": loc, "msg": reason}]) from e
        if loc == "data.uri":
            try:
                problems = submit_problems(spec, where, settings.s3())
            except OSError as e:
                raise Unavailable(f"the dataset's store cannot be reached ({e}); retry") from e
            if problems:
                errors = [{"loc": f, "msg": m} for f, m in problems]
                raise InvalidSpec("; ".join(f"{f}: {m}" for f, m in problems), errors)


def check_source_job(store: JobStore, tenant: str, source_id: str) -> None:
    src = store.get(source_id)
    loc = "finetune.init_from"
    if src is None or src.tenant != tenant:
        raise InvalidSpec(
            f"{loc}: no job {source_id!r} in your tenant", [{"loc": loc, "msg": "unknown job"}]
        )
    if src.kind != "pretrain" or src.state != JobState.SUCCEEDED.value:
        raise InvalidSpec(
            f"{loc}: job {source_id} is a {src.kind} job in state {src.state}; "
            "fine-tuning starts from a succeeded pretrain job",
            [{"loc": loc, "msg": "source job not a succeeded pretrain job"}],
        )
