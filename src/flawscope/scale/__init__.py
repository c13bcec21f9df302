"""Beyond one machine: archives scored on Ray Data, many part-number models fitted as Ray tasks.

* :mod:`flawscope.scale.sources`: what ``predict --engine ray`` reads (folder, glob, list file,
  pyarrow filesystem URI) as one list of image names;
* :mod:`flawscope.scale.results`: the Parquet results folder (typed rows of
  :meth:`~flawscope.pipeline.Prediction.to_row`, error rows, resume);
* :mod:`flawscope.scale.batch`: scoring on Ray Data, one model per worker actor;
* :mod:`flawscope.scale.fit_many`: a manifest of fits, run one after another or as Ray tasks;
* :mod:`flawscope.scale.cluster`: connecting to (or starting) a Ray instance.

Only :mod:`~flawscope.scale.batch`, :mod:`~flawscope.scale.cluster` and the Ray engine of
:mod:`~flawscope.scale.fit_many` import ``ray`` (the optional extra ``flawscope[ray]``), and
only when called.
"""
