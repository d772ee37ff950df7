"""Merging methods, one module each, behind one contract (:mod:`pipeline.merging.contract`)
and one list (:mod:`pipeline.merging.registry`).

Methods on task vectors (weight averaging, Task Arithmetic, TIES-Merging, task negation,
DARE, consensus TA / TIES) stream the K task vectors chunk by chunk from the zarr store
(:class:`pipeline.store.task_vectors.TaskVectorStore`) into one merged task vector added to
the pretrained weights; TALL masks and EMR-Merging stream it into one encoder per task
(task-routed, stored compactly: :class:`pipeline.merging.streamed.RoutedMerge`). Fisher merging and RegMean need the fine-tuned models and some
training examples; multi-task learning trains jointly; AdaMerging learns its coefficients on
unlabeled test images.
"""
