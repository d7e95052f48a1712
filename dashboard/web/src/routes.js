// The pages' addresses (the part after #), shared by every page that links to another.

export function runHref(runId) {
  return `#/run/${encodeURIComponent(runId)}`;
}

export function compareHref(runs, extra = {}) {
  const params = new URLSearchParams();
  for (const run of runs) params.append("run", run);
  for (const [key, value] of Object.entries(extra)) if (value !== undefined && value !== null && value !== "") params.set(key, value);
  return `#/compare?${params}`;
}

export function studyHref(name) {
  return `#/study/${encodeURIComponent(name)}`;
}
