-- One request's consolidated record (a point read by id is cheaper where the SDK allows it).
SELECT * FROM c WHERE c.id = @requestId
