-- Argo CD health check for kubetrain.dev/TrainingRun (argocd-cm key
-- resource.customizations.health.kubetrain.dev_TrainingRun; docs/gitops.md).
-- Reads the run's kstatus conditions (docs: api.md): Succeeded, Stalled, Ready, Reconciling.
local hs = {}

local function condition(kind)
  if obj.status == nil or obj.status.conditions == nil then
    return nil
  end
  for _, c in ipairs(obj.status.conditions) do
    if c.type == kind then
      return c
    end
  end
  return nil
end

local function say(status, c, fallback)
  hs.status = status
  if c ~= nil and c.message ~= nil and c.message ~= "" then
    hs.message = c.message
  elseif c ~= nil and c.reason ~= nil then
    hs.message = c.reason
  else
    hs.message = fallback
  end
  return hs
end

if obj.status == nil then
  return say("Progressing", nil, "Waiting for the operator to pick the run up")
end
local generation = obj.metadata and obj.metadata.generation
if generation ~= nil and obj.status.observedGeneration ~= generation then
  return say("Progressing", nil, "Waiting for the operator to observe generation " .. tostring(generation))
end

local succeeded = condition("Succeeded")
if succeeded ~= nil and succeeded.status == "True" then
  return say("Healthy", succeeded, "The run succeeded")
end
if succeeded ~= nil and succeeded.status == "False" then
  return say("Degraded", succeeded, "The run failed")
end
local stalled = condition("Stalled")
if stalled ~= nil and stalled.status == "True" then
  return say("Degraded", stalled, "The run is stalled")
end
if obj.spec ~= nil and obj.spec.suspend == true then
  return say("Suspended", nil, "spec.suspend is true")
end
local ready = condition("Ready")
if ready ~= nil and ready.status == "True" then
  return say("Healthy", ready, "The run is ready")
end
return say("Progressing", condition("Reconciling") or ready, "The run is in progress")
