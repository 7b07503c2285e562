"""What a job is: the spec dataclasses, job files, option validation, model paths and inputs."""

from .job import DEFAULT_PROMPT, InputSpec, JobSpec, ModelSpec, PromptSpec
from .jobfile import job_from_dict, load_job
from .validation import SpecError

__all__ = [
    "DEFAULT_PROMPT",
    "InputSpec",
    "JobSpec",
    "ModelSpec",
    "PromptSpec",
    "SpecError",
    "job_from_dict",
    "load_job",
]
