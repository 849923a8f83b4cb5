// Stands in for Gloo's <gloo/transport/device.h> (see README.md).
#pragma once
#include "../declarations.h"
