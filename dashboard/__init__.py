"""The live dashboard (``tensordb dashboard``): runs and jobs, live training curves, comparison,
studies, models and data of one project, in a browser.

- :mod:`dashboard.live`: one Kafka consumer of the logs topic per dashboard process, fanned out
  to the browsers over Server-Sent Events, with the seam to MongoDB's history kept gap-free;
- :mod:`dashboard.curves`: reading curves, and the min/max envelope that keeps the overview of
  100 runs × 100,000 points at ~1,000 points per run; :mod:`dashboard.run_index` (runs and their
  jobs) and :mod:`dashboard.catalog` (models, data, stages, dead letters);
- :mod:`dashboard.studies`: a project's studies, and one study whole (trials, curves, verdicts)
  for a page that follows it, sent as only the rows that changed since its last answer;
- :mod:`dashboard.actions`: what a person can do from it (cancel, retry, pause, promote, roll
  back, stop a study, try a model), each a POST behind the token rule and the CSRF check;
- :mod:`dashboard.app`: the FastAPI routes, the token check and the static front end
  (``dashboard/web``, built with npm into ``dashboard/static``).
"""
