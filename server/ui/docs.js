// Swagger UI on this server's own OpenAPI document, with nothing fetched from elsewhere:
// no validator badge (it would call an outside service).
"use strict";

window.ui = SwaggerUIBundle({
  url: "/openapi.json",
  dom_id: "#swagger-ui",
  validatorUrl: null,
  deepLinking: true,
  tryItOutEnabled: true,
});
