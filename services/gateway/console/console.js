// The web console's only script: a running job's live progress, from the gateway's event stream
// (server-sent events fed by WatchJob). The page is complete without it; this keeps it current.
"use strict";

(function () {
  const section = document.querySelector("[data-events]");
  if (!section) {
    return;
  }
  const log = document.getElementById("events");

  function setState(element, state) {
    element.textContent = state;
    element.className = "state state-" + state.toLowerCase();
  }

  function setProgress(element, value) {
    element.value = value;
    element.textContent = Math.round(100 * value) + "%";
  }

  function renderStage(stage) {
    const row = section.querySelector('tr[data-stage="' + CSS.escape(stage.name) + '"]');
    if (!row) {
      return;
    }
    setState(row.querySelector(".stage-state .state"), stage.state);
    setProgress(row.querySelector(".stage-progress progress"), stage.progress);
    row.querySelector(".stage-attempts").textContent = String(stage.attempts);
    row.querySelector(".stage-error").textContent = stage.error;
  }

  function renderFiles(files) {
    const list = document.getElementById("job-files");
    list.replaceChildren(...files.map(function (file) {
      const item = document.createElement("li");
      const link = document.createElement("a");
      link.href = file.url;
      link.textContent = file.name;
      item.append(link, " (" + file.size_bytes + " bytes)");
      return item;
    }));
  }

  function render(job) {
    setState(document.getElementById("job-state"), job.state);
    setProgress(document.getElementById("job-progress"), job.progress);
    document.getElementById("job-percent").textContent = Math.round(100 * job.progress) + "%";
    const error = document.getElementById("job-error");
    error.textContent = job.error;
    error.hidden = !job.error;
    job.stages.forEach(renderStage);
    renderFiles(job.files);
    const report = document.getElementById("report-link");
    if (job.report_url) {
      report.href = job.report_url;
      report.hidden = false;
    }
    const cancel = document.getElementById("cancel");
    if (cancel && job.terminal) {
      cancel.hidden = true;
    }
  }

  function note(text) {
    const item = document.createElement("li");
    item.textContent = text;
    log.append(item);
  }

  const status = document.getElementById("watch-status");
  const source = new EventSource(section.dataset.events);
  source.addEventListener("open", function () {
    status.textContent = "live";
  });
  source.addEventListener("job", function (message) {
    const event = JSON.parse(message.data);
    note("#" + event.sequence + " " + event.kind + (event.stage ? " " + event.stage : "") +
         (event.message ? ": " + event.message : ""));
    section.dataset.sequence = String(event.sequence);
    render(event.job);
  });
  source.addEventListener("end", function () {
    source.close();
    status.textContent = "finished";
    section.dataset.watch = "finished";
  });
  source.addEventListener("failure", function (message) {
    source.close();
    status.textContent = "stream failed: " + JSON.parse(message.data).error;
  });
  source.addEventListener("error", function () {
    if (source.readyState !== EventSource.CLOSED) {
      status.textContent = "reconnecting…"; // the browser retries, resuming after the last event
    }
  });
})();
