"""Captioning and comparison jobs over many models: spec -> plan -> run (durable, resumable) -> report."""

from .spec import DEFAULT_PROMPT, InputSpec, JobSpec, ModelSpec, PromptSpec, SpecError, job_from_dict, load_job


def __getattr__(name):
    # the runner pulls in Ray and the actors layer; import it only when a job actually runs
    if name in ("JobRunner", "JobResult", "run_job"):
        from .running import job

        return getattr(job, name)
    raise AttributeError(name)


__all__ = [
    "JobSpec",
    "ModelSpec",
    "InputSpec",
    "PromptSpec",
    "SpecError",
    "DEFAULT_PROMPT",
    "load_job",
    "job_from_dict",
    "JobRunner",
    "JobResult",
    "run_job",
]
