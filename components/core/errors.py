"""Errors a user can hit. Each names the input (file, record, field) and what was expected."""


class KubellmError(Exception):
    """Base class: an error with a message meant for the person running kubellm."""


class ConfigError(KubellmError):
    """A run-config value is wrong: the message names the field and the allowed values."""


class StorageError(KubellmError):
    """A read or write against local or S3 storage failed after retries."""


class ManifestMissingError(StorageError):
    """A prefix has no committed manifest, so (by the atomic-publish contract) it does not exist."""


class ManifestConflictError(StorageError):
    """A different manifest is already committed at that prefix; it is never overwritten."""


class IntegrityError(StorageError):
    """A file does not match the size or sha256 its manifest records."""


class InputDataError(KubellmError):
    """Bad input data: the message names the file and the offset/line/record."""


class NotImplementedStageError(KubellmError):
    """A stage that is wired into the pipeline but not built yet. Never pretends to succeed."""
