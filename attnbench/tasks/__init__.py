"""Synthetic tasks: generated examples with labels only where the task asks a question, and their metrics."""

from .feed import ExampleSampler, StreamSampler, TaskData, evaluate_task, prepare_task, task_config
from .mqar import (
    IGNORE_INDEX,
    MQARConfig,
    MQARData,
    accuracy,
    example_accuracies,
    gap_weights,
    load_mqar,
    make_mqar,
    masked_loss,
    prepare_mqar,
    sample_examples,
    split_stream,
)

__all__ = [
    "ExampleSampler",
    "StreamSampler",
    "TaskData",
    "evaluate_task",
    "prepare_task",
    "task_config",
    "IGNORE_INDEX",
    "MQARConfig",
    "MQARData",
    "accuracy",
    "example_accuracies",
    "gap_weights",
    "load_mqar",
    "make_mqar",
    "masked_loss",
    "prepare_mqar",
    "sample_examples",
    "split_stream",
]
